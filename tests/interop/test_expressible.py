"""Export refuses what the target family cannot express; import refuses what it does not map."""

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from moekit.interop import from_hf, keymap, to_hf  # noqa: E402
from moekit.interop.hf import FAMILIES  # noqa: E402
from moekit.models import TransformerLM  # noqa: E402
from moekit.models.transformer import AttentionConfig, RotaryConfig  # noqa: E402

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
HF_CONFIGS = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8),
    ),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8)),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=1,
            kv_lora_rank=8,
            q_lora_rank=0,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
        ),
    ),
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
}


def _hf_dict(family: str, **changes) -> dict:
    cls, extra = HF_CONFIGS[family]
    return getattr(transformers, cls)(**{**TINY, **extra, **changes}).to_dict()


def _moekit_config(family: str, **changes):
    """The family's tiny config with changes: ``router_x`` (router option), ``expert_x``
    (expert option), ``attention_x`` (attention option), anything else a model option."""
    config = FAMILIES[family].config_from_hf(_hf_dict(family))
    expert_changes = {k[7:]: v for k, v in changes.items() if k.startswith("expert_")}
    router_changes = {k[7:]: v for k, v in changes.items() if k.startswith("router_")}
    attention_changes = {k[10:]: v for k, v in changes.items() if k.startswith("attention_")}
    top = {
        k: v for k, v in changes.items() if not k.startswith(("expert_", "router_", "attention_"))
    }
    top["attention"] = dataclasses.replace(config.attention, **attention_changes)
    if config.token_mixers is not None:  # the blocks' own attention configs change alike
        mixers = {
            name: dataclasses.replace(mixer, **attention_changes)
            if isinstance(mixer, AttentionConfig)
            else mixer
            for name, mixer in config.token_mixers.mixers.items()
        }
        top["token_mixers"] = dataclasses.replace(config.token_mixers, mixers=mixers)
    layer = config.moe.layer
    layer = dataclasses.replace(
        layer,
        router=dataclasses.replace(layer.router, **router_changes),
        experts=dataclasses.replace(layer.experts, **expert_changes),
    )
    moe = dataclasses.replace(config.moe, layer=layer)
    return dataclasses.replace(config, moe=moe, **top)


@pytest.mark.parametrize("family", sorted(HF_CONFIGS))
def test_every_key_of_the_transformers_config_is_classified(family):
    """Each key transformers writes for the family is mapped, fixed or known to be inert."""
    hf = _hf_dict(family)
    fields = FAMILIES[family].HF_FIELDS
    unclassified = {k for k in hf if not k.startswith("_")} - fields.known()
    assert not unclassified, unclassified
    FAMILIES[family].config_from_hf(hf)  # and the default config imports


@pytest.mark.parametrize(
    "family, changes, field",
    [
        ("olmoe", dict(hidden_act="gelu_pytorch_tanh"), "hidden_act='gelu_pytorch_tanh'"),
        ("olmoe", dict(clip_qkv=8.0), "clip_qkv=8.0"),
        ("mixtral", dict(sliding_window=16), "sliding_window=16"),
        ("qwen3_moe", dict(attention_bias=True), "attention_bias=True"),
        ("qwen3_moe", dict(use_sliding_window=True, sliding_window=8), "use_sliding_window"),
        ("deepseek_v3", dict(hidden_act="gelu"), "hidden_act='gelu'"),
        ("llama", dict(mlp_bias=True), "mlp_bias=True"),
        ("mixtral", dict(some_new_feature=3), "some_new_feature=3"),
    ],
)
def test_import_refuses_fields_it_does_not_map(family, changes, field):
    with pytest.raises(ValueError, match="cannot import") as info:
        FAMILIES[family].config_from_hf(_hf_dict(family, **changes))
    assert field in str(info.value)


def test_quantised_configs_are_named():
    hf = _hf_dict("mixtral")
    hf["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(ValueError, match=r"quantised \(quantization_config.quant_method='fp8'\)"):
        FAMILIES["mixtral"].config_from_hf(hf)


@pytest.mark.parametrize(
    "family, changes, fields",
    [
        (
            "mixtral",
            dict(router_routed_scaling_factor=2.0),
            ["moe.layer.router.routed_scaling_factor"],
        ),
        ("mixtral", dict(expert_bias=True), ["moe.layer.experts.bias"]),
        (
            "mixtral",
            dict(attention_o_bias=True, attention_sinks=True),
            ["attention.o_bias", "attention.sinks"],
        ),
        ("mixtral", dict(attention_sliding_window=4), ["attention.sliding_window"]),
        (
            "qwen3_moe",
            dict(attention_sliding_window=4, router_routed_scaling_factor=3.0),
            ["attention.sliding_window", "moe.layer.router.routed_scaling_factor"],
        ),
        ("qwen2_moe", dict(attention_o_bias=True), ["attention.o_bias"]),
        (
            "olmoe",
            dict(expert_bias=True, activation="geglu"),
            ["moe.layer.experts.bias", "activation"],
        ),
        ("olmoe", dict(router_bias_balancing=True), ["moe.layer.router.bias_balancing"]),
    ],
)
def test_export_refuses_and_lists_every_option_the_family_lacks(family, changes, fields, tmp_path):
    model = TransformerLM(_moekit_config(family, **changes))
    with pytest.raises(ValueError, match=f"cannot export as '{family}'") as info:
        to_hf(model, tmp_path / "out", family)
    for field in fields:
        assert f"{field}=" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_keymap_export_reports_tensors_it_has_no_place_for():
    config = _moekit_config("mixtral")
    state = TransformerLM(config).state_dict()
    state["blocks.0.attn.o_proj.bias"] = torch.zeros(32)
    entries = next(iter(FAMILIES["mixtral"].keymaps(config).values()))
    with pytest.raises(ValueError, match=r"no place for \['blocks.0.attn.o_proj.bias'\]"):
        keymap.to_hf(state, entries, n_layers=2, moe_layers=[0, 1], num_experts=4)


def _reloaded_logits_match(model: TransformerLM, family: str, folder) -> None:
    to_hf(model, folder, family)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(tokens).logits
        assert (reloaded(tokens).logits - expected).abs().max() <= 1e-4


def test_gpt_oss_without_rope_scaling_reloads_with_the_same_logits(tmp_path):
    """transformers' GPT-OSS defaults to YaRN: export must write the default rope explicitly."""
    config = _moekit_config("gpt_oss", attention_rope=RotaryConfig(theta=1e4))
    torch.manual_seed(0)
    _reloaded_logits_match(TransformerLM(config), "gpt_oss", tmp_path / "gpt_oss")
    assert from_hf(tmp_path / "gpt_oss").config.attention.rope.scaling is None


# Each change is expressible by some families and not by others; a drawn case applies 0-2.
CHANGES = [
    ("router_routed_scaling_factor", 2.5),
    ("router_normalize_weights", False),
    ("router_normalize_weights", True),
    ("expert_bias", True),
    ("attention_o_bias", True),
    ("attention_qkv_bias", True),
    ("attention_sliding_window", 4),
    ("attention_qk_norm", "none"),
    ("attention_qk_norm", "head"),
    ("attention_qk_norm", "full"),
    ("activation", "geglu"),
    ("expert_activation", "geglu"),
    ("tie_embeddings", True),
]
OPTIONS = st.lists(st.sampled_from(CHANGES), max_size=2, unique_by=lambda c: c[0]).map(dict)


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_all_moe_families_export_experts_narrower_than_the_unused_dense_width(family, tmp_path):
    """Every layer of these families is MoE, so moekit's dense ``ffn_hidden`` is moot: a model
    whose experts are narrower than it (the demo's MoE twin) exports with the experts' width as
    ``intermediate_size`` and reloads with the same logits."""
    config = _moekit_config(family, expert_hidden=8)
    assert config.ffn_hidden != 8
    torch.manual_seed(0)
    model = TransformerLM(config).eval()
    to_hf(model, tmp_path / "out", family)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.intermediate_size == 8
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (reloaded(tokens).logits - model(tokens).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(options=OPTIONS)
def test_export_either_refuses_or_round_trips_logits(family, options, tmp_path_factory):
    config = _moekit_config(family, **options)
    torch.manual_seed(0)
    model = TransformerLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "router" in name:
                p.normal_(std=0.5)
    folder = tmp_path_factory.mktemp("export") / "out"
    try:
        to_hf(model, folder, family)
    except ValueError as error:
        assert "cannot export" in str(error)
        assert not folder.exists()
        return
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (reloaded(tokens).logits - model.eval()(tokens).logits).abs().max() <= 1e-4
