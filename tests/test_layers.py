"""The MoE layer against the looped reference, plus its defining properties and input errors."""

import dataclasses

import pytest
import torch

import moekit
from moekit.experts.grouped_matmul import grouped_mm_available
from moekit.models.common.attention import AttentionConfig
from tests.builders import (
    assert_layer_matches_reference,
    loss_and_grads,
    make_moe,
)

KERNELS = ["loop"] + (["grouped_mm"] if grouped_mm_available(torch.float32) else [])

LAYER_OPTIONS = {
    "dropless": dict(),
    "capacity_probability": dict(
        dispatch=moekit.DispatchConfig(mode="capacity", capacity_factor=0.5, min_capacity=1)
    ),
    "capacity_position": dict(
        dispatch=moekit.DispatchConfig(
            mode="capacity", capacity_factor=0.5, min_capacity=1, drop_priority="position"
        )
    ),
    "capacity_token": dict(
        dispatch=moekit.DispatchConfig(
            mode="capacity", capacity_factor=0.5, min_capacity=1, drop_priority="token"
        )
    ),
    "shared_gated": dict(
        shared_experts=moekit.SharedExpertConfig(hidden=10, gated=True, activation="gelu")
    ),
    "sigmoid_groups_bias": dict(
        router=moekit.RouterConfig(
            gating="sigmoid_topk", num_groups=2, topk_groups=1, routed_scaling_factor=1.5
        )
    ),
    "topk_softmax_top1": dict(top_k=1, router=moekit.RouterConfig(gating="topk_softmax")),
}
ACTIVATIONS = ["relu", "gelu", "silu", "swiglu", "geglu"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", sorted(LAYER_OPTIONS))
def test_layer_matches_looped_reference(name, kernel):
    options = dict(LAYER_OPTIONS[name])
    top_k = options.pop("top_k", 2)
    moe = make_moe(top_k=top_k, experts=moekit.ExpertConfig(hidden=12, kernel=kernel), **options)
    assert_layer_matches_reference(moe.train(), torch.randn(3, 7, 8))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_every_activation_and_bias_matches_reference(activation, bias):
    moe = make_moe(experts=moekit.ExpertConfig(hidden=12, activation=activation, bias=bias))
    assert_layer_matches_reference(moe, torch.randn(2, 9, 8))


def test_module_experts_any_module():
    experts = [
        torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.Tanh(), torch.nn.Linear(5, 8))
        for _ in range(4)
    ]
    router = moekit.RouterConfig().build(d_model=8, num_experts=4, top_k=2)
    moe = moekit.MoE(d_model=8, router=router, experts=moekit.ModuleExperts(experts))
    assert_layer_matches_reference(moe, torch.randn(11, 8))


def test_one_expert_top1_equals_dense_ffn():
    dense = moekit.FeedForward(8, 16, activation="swiglu", bias=True)
    moe = make_moe(num_experts=1, top_k=1, experts=moekit.ExpertConfig(hidden=16, bias=True))
    with torch.no_grad():
        moe.experts.w_in_EDH[0].copy_(dense.w_in_DH)
        moe.experts.w_out_EHD[0].copy_(dense.w_out_HD)
        moe.experts.b_in_EH[0].copy_(dense.b_in_H)
        moe.experts.b_out_ED[0].copy_(dense.b_out_D)
    x = torch.randn(4, 5, 8)
    out_moe, g_moe = loss_and_grads(moe, x, lambda x_: moe(x_).output)
    out_dense, g_dense = loss_and_grads(dense, x, dense)
    torch.testing.assert_close(out_moe, out_dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_moe["x"], g_dense["x"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        g_moe["experts.w_in_EDH"][0], g_dense["w_in_DH"], rtol=1e-5, atol=1e-6
    )


def test_layer_gradcheck_float64():
    for dispatch in (
        moekit.DispatchConfig(),
        moekit.DispatchConfig(mode="capacity", capacity_factor=0.7, min_capacity=1),
    ):
        moe = make_moe(
            d_model=4,
            hidden=3,
            shared_experts=moekit.SharedExpertConfig(hidden=2, gated=True),
            aux_loss=moekit.AuxLossConfig(switch=0.1, z_loss=0.1, importance=0.1),
            dispatch=dispatch,
        ).double()
        x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
        params = [p for p in moe.parameters()]

        def fn(x_, *_, moe=moe):
            out = moe(x_)
            return out.output, out.aux_loss

        assert torch.autograd.gradcheck(fn, (x, *params))


def test_input_validation_errors_name_the_argument():
    moe = make_moe()
    with pytest.raises(ValueError, match="d_model=8"):
        moe(torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating-point"):
        moe(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="padding_mask must have shape"):
        moe(torch.randn(2, 3, 8), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding_mask must be a bool"):
        moe(torch.randn(2, 3, 8), torch.ones(2, 3))
    checked = make_moe(check_finite=True)
    with pytest.raises(ValueError, match="NaN"):
        checked(torch.full((2, 8), float("nan")))


@pytest.mark.parametrize("top_k", [0, 5])
def test_top_k_outside_one_to_num_experts_is_rejected(top_k):
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts=4\]"):
        make_moe(top_k=top_k)


@pytest.mark.parametrize("factor", [0.0, -1.0, float("nan")])
def test_capacity_factor_must_be_positive(factor):
    with pytest.raises(ValueError, match="capacity_factor must be"):
        moekit.DispatchConfig(mode="capacity", capacity_factor=factor)
    with pytest.raises(ValueError, match="eval_capacity_factor must be"):
        moekit.DispatchConfig(eval_capacity_factor=factor)


def test_load_loss_requires_noisy_gating():
    with pytest.raises(ValueError, match="noisy_gating"):
        make_moe(aux_loss=moekit.AuxLossConfig(load=0.1))


def test_any_leading_dims_and_bf16():
    moe = make_moe()
    for shape in [(8,), (5, 8), (2, 3, 4, 8)]:
        assert moe(torch.randn(shape)).output.shape == shape
    moe_bf16 = make_moe().to(torch.bfloat16)
    out = moe_bf16(torch.randn(4, 6, 8, dtype=torch.bfloat16))
    assert out.output.dtype == torch.bfloat16
    assert out.routing.logits_TE.dtype == torch.float32  # router computed in float32


def test_an_moe_layers_width_is_given_at_build_time():
    """``MoEConfig.build(*, d_model)`` like every other component: a model passes its own width;
    the old ``MoEConfig(d_model=...)`` still builds, with a ``DeprecationWarning``; an old file's
    ``moe.layer.d_model`` is read when it equals the model's and refused by name otherwise."""
    from moekit.models import MoEPlacementConfig, TransformerConfig
    from moekit.utils.serialization import config_from_dict
    from moekit.utils.validation import ConfigError

    layer = moekit.MoEConfig(num_experts=4, top_k=2, experts=moekit.ExpertConfig(hidden=16))
    assert "d_model" not in {f.name for f in dataclasses.fields(layer)}
    config = TransformerConfig(
        vocab_size=32,
        d_model=24,
        n_layers=2,
        attention=AttentionConfig(n_heads=2),
        ffn_hidden=48,
        moe=MoEPlacementConfig(layer=layer),
    )
    model = config.build()
    assert model.blocks[0].ffn.d_model == 24
    assert layer.build(d_model=12).d_model == 12
    with pytest.raises(ValueError, match=r"MoEConfig\.build needs d_model"):
        layer.build()
    with pytest.warns(DeprecationWarning, match=r"build\(d_model=\.\.\.\)"):
        old = moekit.MoEConfig(
            d_model=8, num_experts=4, top_k=2, experts=moekit.ExpertConfig(hidden=16)
        )
    assert old.build().d_model == 8
    data = {
        "vocab_size": 32,
        "d_model": 24,
        "n_layers": 2,
        "ffn_hidden": 48,
        "attention": {"n_heads": 2},
        "moe": {"layer": {"d_model": 24, "num_experts": 4, "top_k": 2, "experts": {"hidden": 8}}},
    }
    assert config_from_dict(TransformerConfig, data).moe.layer.num_experts == 4
    data["moe"]["layer"]["d_model"] = 16
    with pytest.raises(ConfigError, match=r"moe\.layer\.d_model=16 differs from the model's"):
        config_from_dict(TransformerConfig, data)


def test_dispatch_config_builds_its_dispatcher():
    from moekit.dispatch.dispatcher import Dispatcher

    dispatcher = moekit.DispatchConfig(mode="capacity").build(num_experts=4)
    assert isinstance(dispatcher, Dispatcher) and dispatcher.num_experts == 4


def test_attention_and_blocks_are_built_from_configs():
    from moekit.models import AttentionConfig, TransformerConfig
    from moekit.models.common.attention import Attention
    from moekit.models.common.mla import MLAConfig, MultiHeadLatentAttention
    from moekit.models.transformer import TokenMixerLayout

    with pytest.raises(
        ValueError, match=r"n_heads=6 must be a multiple of attention\.n_kv_heads=4"
    ):
        AttentionConfig(n_heads=6, n_kv_heads=4, head_dim=8)
    # the attention mixers are siblings: no config holds another's options
    with pytest.raises(TypeError, match="mla"):
        AttentionConfig(n_heads=2, mla=MLAConfig(n_heads=2))  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="sinks"):
        MLAConfig(n_heads=2, sinks=True)  # type: ignore[call-arg]
    attention = AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=8, sliding_window=3)
    module = attention.build(d_model=16)
    assert isinstance(module, Attention) and module.config is attention
    full = AttentionConfig(n_heads=4, n_kv_heads=2)
    config = TransformerConfig(
        vocab_size=32,
        d_model=16,
        n_layers=2,
        attention=full,
        token_mixers=TokenMixerLayout(
            pattern=["sliding", "attention"],
            mixers={"sliding": dataclasses.replace(full, sliding_window=3)},
        ),
        ffn_hidden=32,
    )
    # block i's attention: its own config from the layer pattern
    windows = [config.attention_of_layer(i).sliding_window for i in range(2)]
    model = config.build()
    assert [b.attn.sliding_window for b in model.blocks] == windows == [3, 0]
    # the defaults are resolved once, against the model's width
    assert (config.attention.head_dim, config.attention.n_kv_heads) == (4, 2)
    assert model.blocks[0].attn.q_norm is None  # qk norms (when on) take the model's norm_eps
    mla = TransformerConfig(
        vocab_size=32,
        d_model=16,
        n_layers=1,
        attention=MLAConfig(n_heads=2, kv_lora_rank=8, qk_rope_head_dim=4),
        ffn_hidden=32,
    ).build()
    assert isinstance(mla.blocks[0].attn, MultiHeadLatentAttention)


def test_a_config_file_from_before_the_attention_siblings_loads_the_same_model():
    from moekit.models import TransformerConfig
    from moekit.models.common.mla import MLAConfig
    from moekit.utils.serialization import config_from_dict, config_to_dict

    old = {
        "vocab_size": 32,
        "d_model": 16,
        "n_layers": 4,
        "ffn_hidden": 32,
        "norm_eps": 1e-5,
        "attention": {
            "n_heads": 4,
            "rope_theta": 5e5,
            "rotary": True,
            "partial_rotary_factor": 0.5,
            "sliding_window": 3,
            "sliding_window_every": 2,
            "norm_eps": 1e-5,
            "qk_norm": "weightless",
            "no_rope_layers": [3],
            "temperature_floor_scale": 8,
            "temperature_scale": 0.2,
        },
    }
    config = config_from_dict(TransformerConfig, old)
    layers = [config.attention_of_layer(i) for i in range(4)]
    assert [a.sliding_window for a in layers] == [3, 0, 3, 0]
    assert [a.rope is None for a in layers] == [False, False, False, True]
    assert layers[0].rope.theta == 5e5 and layers[0].rope.partial_factor == 0.5
    assert layers[3].query_temperature.floor_scale == 8 and layers[0].query_temperature is None
    assert layers[3].qk_norm == "none" and layers[1].qk_norm == "weightless"
    # and today's form round-trips
    assert config_from_dict(TransformerConfig, config_to_dict(config)) == config
    old_mla = {
        **old,
        "attention": {"n_heads": 2, "rope_theta": 1e4, "mla": {"kv_lora_rank": 8}},
    }
    mla = config_from_dict(TransformerConfig, old_mla).attention
    assert isinstance(mla, MLAConfig) and (mla.n_heads, mla.kv_lora_rank) == (2, 8)


def test_a_flat_attention_key_names_its_new_home():
    from moekit.training.config import load_train_config
    from moekit.utils.serialization import ConfigError

    with pytest.raises(ConfigError, match=r"model.n_heads is now model.attention.n_heads"):
        load_train_config(None, ["model.n_heads=2"])
    with pytest.raises(ConfigError, match=r"model.attention_sinks is now model.attention.sinks"):
        load_train_config(None, ["model.attention_sinks=true"])
