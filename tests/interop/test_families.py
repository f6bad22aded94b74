"""Qwen2-MoE, Qwen3-MoE and OLMoE: import parity, export that transformers reloads, re-import."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.interop import from_hf, to_hf  # noqa: E402

FAMILIES = {
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            shared_expert_intermediate_size=40,
            moe_intermediate_size=24,
            num_experts=4,
            decoder_sparse_step=2,
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(moe_intermediate_size=24, num_experts=4, head_dim=8, norm_topk_prob=True),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(num_experts=4, eos_token_id=None, pad_token_id=None, bos_token_id=None),
    ),
}


def _hf(name):
    config_cls, model_cls, extra = FAMILIES[name]
    config = getattr(transformers, config_cls)(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        **extra,
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(std=0.5)
    return model


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_round_trip(name, tmp_path):
    hf = _hf(name)
    ours = from_hf(hf).eval()
    tokens = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        expected = hf(tokens).logits
        assert (ours(tokens).logits - expected).abs().max() <= 1e-4
    to_hf(ours, tmp_path / "export", name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    again = from_hf(tmp_path / "export").eval()
    with torch.no_grad():
        assert (reloaded(tokens).logits - expected).abs().max() <= 1e-4
        assert torch.equal(again(tokens).logits, ours(tokens).logits)


def test_qwen2_layout_details():
    ours = from_hf(_hf("qwen2_moe"))
    kinds = [type(b.ffn).__name__ for b in ours.blocks]
    assert kinds == ["FeedForward", "MoE"]  # decoder_sparse_step=2
    moe = ours.blocks[1].ffn
    assert moe.shared_experts.gate is not None and not moe.router.config.normalize_weights
    assert ours.blocks[0].attn.q_proj.bias is not None
