"""Accounting against published figures (configs written out from the published values) and
against the actual parameter count of built moekit models."""

import json
from pathlib import Path

import pytest

import moekit
from moekit.analysis.params import count_parameters
from moekit.cli.main import main
from moekit.models import MoEPlacementConfig, TransformerConfig, TransformerLM, save_pretrained
from moekit.models.common.attention import AttentionConfig
from tests.builders import placement

CONFIGS = Path(__file__).parent / "hf_configs"

# (file, published total, published active, which active the publisher counts, tolerance)
# "active" includes the input embedding (Mistral, Qwen model cards); "active_non_embedding"
# leaves it out (OpenAI, DeepSeek, Databricks count compute).
PUBLISHED = [
    ("mixtral-8x7b.json", 46.7e9, 12.9e9, "active", 0.01),
    ("qwen1.5-moe-a2.7b.json", 14.3e9, 2.7e9, "active", 0.01),
    ("qwen3-235b-a22b.json", 235e9, 22e9, "active", 0.01),
    ("gpt-oss-120b.json", 116.83e9, 5.13e9, "active_non_embedding", 0.01),
    ("gpt-oss-20b.json", 20.91e9, 3.61e9, "active_non_embedding", 0.01),
    ("deepseek-v2.json", 236e9, 21e9, "active_non_embedding", 0.01),
    ("deepseek-v3.json", 671e9, 37e9, "active_non_embedding", 0.011),  # 36.63B: 1.01% off
    ("dbrx.json", 132e9, 36e9, "active_non_embedding", 0.01),
    # Published to two digits only: OLMoE 6.9B/1.3B (we count 1.28B, 1.4% off but equal to
    # the published precision); Qwen3-30B-A3B 30.5B/3.3B (we count 3.35B, the card truncates).
    ("olmoe-1b-7b.json", 6.9e9, 1.3e9, "active", 0.015),
    ("qwen3-30b-a3b.json", 30.5e9, 3.3e9, "active", 0.017),
    # the families of issue 23 (model cards; docs/families.md lists what each publisher counts)
    ("dots.llm1.json", 142e9, 14e9, "active", 0.01),
    ("phi-3.5-moe.json", 41.9e9, 6.6e9, "active", 0.01),
    ("granite-3.0-3b-a800m.json", 3.3e9, 0.8e9, "active_non_embedding", 0.01),
    # 109B counts the vision tower too (the text model: 107.77B, 1.1% off)
    ("llama-4-scout-17b-16e.json", 109e9, 17e9, "active", 0.012),
    ("llama-4-maverick-17b-128e.json", 400e9, 17e9, "active", 0.011),
    # published to two digits: 12.75B is "13B"
    ("hunyuan-a13b.json", 80e9, 13e9, "active", 0.02),
]
# totals only: Zhipu and MiniMax publish active counts without the embedding *and* the head
# (GLM-4.5: 32.08B = 32B; GLM-4.5-Air: 12.18B = 12B) or to one digit (MiniMax-M2: "10B")
PUBLISHED_TOTALS = [
    ("glm-4.5.json", 355e9),
    ("glm-4.5-air.json", 106e9),
    ("minimax-m2.json", 230e9),
    ("deepseek-v2-lite.json", 15.7e9),  # active: 2.45B without the embedding, "2.4B" published
]


@pytest.mark.parametrize(("name", "total"), PUBLISHED_TOTALS)
def test_published_totals(name, total):
    report = count_parameters(CONFIGS / name)
    assert report.total == pytest.approx(total, rel=0.01)
    without_head = report.active_non_embedding - report.breakdown["lm_head"]
    assert without_head > 0.9 * report.active_non_embedding


# Switch Transformers (Fedus et al. 2021, Table 9, and the google/switch-* model cards): totals
# 619M, 7.4B and 1571B; Switch-Base is FLOP-matched to T5-Base, whose 223M parameters are what
# one token touches (active), whatever the number of experts.
SWITCH = [
    ("switch-base-8.json", 619e6, 223e6),
    ("switch-base-128.json", 7.4e9, 223e6),
    ("switch-c-2048.json", 1571e9, None),
]


@pytest.mark.parametrize(("name", "total", "active"), SWITCH)
def test_switch_transformer_published_totals(name, total, active):
    report = count_parameters(CONFIGS / name)
    assert report.total == pytest.approx(total, rel=0.01)
    if active is not None:
        assert report.active == pytest.approx(active, rel=0.01)
    assert report.breakdown["lm_head"] == 0  # tied


def test_switch_accounting_equals_a_built_model():
    from moekit.interop.switch_transformers import config_from_hf

    data = json.loads((CONFIGS / "switch-base-8.json").read_text())
    data.update(
        d_model=16,
        d_kv=4,
        d_ff=24,
        num_heads=4,
        vocab_size=40,
        num_layers=4,
        num_decoder_layers=3,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=1,
    )
    model = config_from_hf(data).build()
    assert count_parameters(model).total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "total", "active", "convention", "tol"), PUBLISHED)
def test_published_totals_and_active_counts(name, total, active, convention, tol):
    report = count_parameters(CONFIGS / name)
    assert report.total == pytest.approx(total, rel=max(tol, 0.01))
    assert getattr(report, convention) == pytest.approx(active, rel=tol)
    assert report.weight_bytes["bf16"] == 2 * report.total
    assert report.flops_per_token > 2 * report.active_non_embedding


def test_qwen3_non_embedding_total_matches_model_card():
    report = count_parameters(CONFIGS / "qwen3-30b-a3b.json")
    non_embedding = report.total - report.breakdown["embeddings"] - report.breakdown["lm_head"]
    assert non_embedding == pytest.approx(29.9e9, rel=0.005)


@pytest.mark.parametrize(
    "moe",
    [
        MoEPlacementConfig(),
        placement(
            16,
            num_experts=6,
            top_k=2,
            expert_hidden=24,
            every=2,
            shared_experts=moekit.SharedExpertConfig(hidden=16, gated=True),
            router=moekit.RouterConfig(bias=True, noisy_gating=True),
        ),
        placement(16, num_experts=4, top_k=1, expert_hidden=8, first_dense=1),
    ],
)
@pytest.mark.parametrize(
    ("tied", "qkv_bias", "qk_norm"),
    [(False, False, "none"), (True, True, "head"), (False, False, "full")],
)
def test_moekit_counts_equal_the_built_model(moe, tied, qkv_bias, qk_norm):
    cfg = TransformerConfig(
        attention=AttentionConfig(qkv_bias=qkv_bias, qk_norm=qk_norm, n_heads=4, n_kv_heads=2),
        vocab_size=50,
        d_model=16,
        n_layers=4,
        ffn_hidden=40,
        tie_embeddings=tied,
        moe=moe,
    )
    model = TransformerLM(cfg)
    report = count_parameters(model)
    assert report.total == sum(p.numel() for p in model.parameters())
    unused = sum(
        (moe.num_experts - moe.layer.top_k) * b.ffn.experts.w_in_EDH[0].numel()
        + (moe.num_experts - moe.layer.top_k) * b.ffn.experts.w_out_EHD[0].numel()
        for b in model.blocks
        if isinstance(b.ffn, moekit.MoE)
    )
    assert report.active == report.total - unused


def test_moekit_gpt_oss_style_counts_equal_the_built_model():
    cfg = TransformerConfig(
        vocab_size=50,
        d_model=16,
        n_layers=2,
        attention=AttentionConfig(
            n_heads=4,
            n_kv_heads=2,
            qkv_bias=True,
            o_bias=True,
            sinks=True,
            sliding_window=4,
        ),
        ffn_hidden=8,
        activation="swiglu_oai",
        moe=placement(
            16,
            num_experts=4,
            top_k=2,
            expert_hidden=8,
            expert_bias=True,
            router=moekit.RouterConfig(gating="topk_softmax", bias=True),
        ),
    )
    model = TransformerLM(cfg)
    assert count_parameters(model).total == sum(p.numel() for p in model.parameters())


def test_moekit_mla_counts_equal_the_built_model():
    from moekit.models.common.mla import MLAConfig

    for q_rank in (0, 12):
        cfg = TransformerConfig(
            vocab_size=50,
            d_model=16,
            n_layers=2,
            attention=MLAConfig(
                n_heads=4,
                q_lora_rank=q_rank,
                kv_lora_rank=8,
                qk_nope_head_dim=4,
                qk_rope_head_dim=4,
                v_head_dim=6,
            ),
            ffn_hidden=24,
        )
        model = TransformerLM(cfg)
        assert count_parameters(model).total == sum(p.numel() for p in model.parameters())


def test_unsupported_family_and_missing_field():
    with pytest.raises(ValueError, match="not supported"):
        count_parameters({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="lacks the field 'num_local_experts'"):
        count_parameters(
            {
                "model_type": "mixtral",
                "vocab_size": 1,
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 4,
                "num_experts_per_tok": 1,
            }
        )


def test_cli_table_and_json(capsys, tmp_path):
    assert main(["params", str(CONFIGS / "mixtral-8x7b.json")]) == 0
    out = capsys.readouterr().out
    assert "46.70B total" in out and "12.88B active" in out and "routed_experts" in out
    assert main(["params", str(CONFIGS / "mixtral-8x7b.json"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"] == count_parameters(CONFIGS / "mixtral-8x7b.json").total
    model = TransformerLM(
        TransformerConfig(
            vocab_size=20, d_model=8, n_layers=1, attention=AttentionConfig(n_heads=2), ffn_hidden=8
        )
    )
    save_pretrained(model, tmp_path / "m")
    assert main(["params", str(tmp_path / "m"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == sum(
        p.numel() for p in model.parameters()
    )
    assert main(["params", str(tmp_path / "missing.json")]) == 2
    assert "no config.json" in capsys.readouterr().err
