"""Gemma 4's pieces as options of moekit's own model (issue 31): a layout's own attention config
(another head width, key/value heads, values from the keys, proportional rotary positions),
sandwich norms, a dense FFN beside the MoE layer against a loop over tokens and experts, the
router's input norm and expert scales, layer scalars and soft-capped logits; decoding, padding,
files, accounting and the command line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from moekit.analysis.params import count_parameters
from moekit.cli.main import main
from moekit.experts import ExpertConfig
from moekit.experts.activations import Activation, apply_activation
from moekit.layers import MoEConfig
from moekit.layers.dense_beside import DenseBesideMoE
from moekit.models import TransformerConfig
from moekit.models.common.attention import AttentionConfig, QKNorm, ValueSource
from moekit.models.common.block import NormPosition
from moekit.models.common.layout import TokenMixerLayout
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.common.rotary import RopeScalingConfig, RotaryConfig, rotary_tables
from moekit.routing import SoftRouterConfig, TopKRouterConfig
from moekit.training import load_train_config
from moekit.utils.serialization import config_from_dict, config_to_dict

ROOT = Path(__file__).resolve().parents[2]
EPS = 1e-5  # the model's norm_eps


def gemma_like(**overrides) -> TransformerConfig:
    sliding = AttentionConfig(
        n_heads=4, n_kv_heads=2, head_dim=8, qk_norm=QKNorm.HEAD, values=ValueSource.NORMED,
        scale=1.0, sliding_window=4,
    )  # fmt: skip
    proportional = RopeScalingConfig(
        kind="proportional", factor=1.0, original_max_position_embeddings=32, rotated_fraction=0.5
    )
    full = AttentionConfig(
        n_heads=4, n_kv_heads=1, head_dim=16, qk_norm=QKNorm.HEAD, values=ValueSource.KEYS,
        scale=1.0, rope=RotaryConfig(theta=1e6, scaling=proportional),
    )  # fmt: skip
    options = dict(
        vocab_size=64,
        d_model=32,
        n_layers=4,
        ffn_hidden=24,
        activation=Activation.GEGLU_TANH,
        max_seq_len=32,
        attention=sliding,
        token_mixers=TokenMixerLayout(pattern=["attention", "global"], mixers={"global": full}),
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=6,
                top_k=2,
                experts=ExpertConfig(hidden=12, activation=Activation.GEGLU_TANH),
                router=TopKRouterConfig(),
                expert_scales=True,
            ),
            dense_beside=True,
        ),
        norm_position=NormPosition.SANDWICH,
        layer_scalars=True,
        logit_softcap=5.0,
        embedding_multiplier=32**0.5,
    )
    return TransformerConfig(**{**options, **overrides})


@pytest.fixture
def model():
    torch.manual_seed(0)
    built = gemma_like().build().eval()
    with torch.no_grad():  # scales and norms away from their initial ones
        for name, tensor in built.state_dict().items():
            if name.endswith(("layer_scalar", "expert_scale_E", "norm.weight")):
                tensor.copy_(1 + 0.3 * torch.randn_like(tensor))
    return built


def test_each_block_builds_its_own_attention(model):
    widths = [(b.attn.head_dim, b.attn.n_kv_heads, b.attn.v_proj is None) for b in model.blocks]
    assert widths == [(8, 2, False), (16, 1, True)] * 2
    assert model.rope_table_of_block == [0, 1, 0, 1] and model.rope_cos_1.shape == (32, 16)
    assert all(isinstance(b.ffn, DenseBesideMoE) and b.ffn_norm is None for b in model.blocks)


def test_proportional_rotation_turns_only_the_first_frequencies():
    scaling = RopeScalingConfig(
        kind="proportional", factor=2.0, original_max_position_embeddings=8, rotated_fraction=0.25
    )
    cos, sin = rotary_tables(16, 8, 100.0, scaling)
    inv_freq = torch.zeros(8)
    inv_freq[:2] = 1.0 / 100.0 ** (torch.tensor([0.0, 2.0]) / 16) / 2.0
    angles = torch.outer(torch.arange(8.0), inv_freq)
    torch.testing.assert_close(cos, torch.cat([angles, angles], -1).cos())
    torch.testing.assert_close(sin[:, 2:8], torch.zeros(8, 6))  # frequency 0: no rotation


def _reference(module: DenseBesideMoE, x_TD: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the dense branch, the router on the raw input (RMS
    norm, learned scale, D^-0.5, softmax, top-k renormalised, times the expert's scale), the
    experts on the normalised input, each branch post-normed, summed."""
    moe, router = module.moe, module.moe.router
    bank = moe.experts
    D = x_TD.shape[-1]
    rows = []
    for x in x_TD:
        dense = module.dense_out_norm(module.dense(module.dense_norm(x)))
        r = x * torch.rsqrt(x.pow(2).mean() + EPS)
        probs = torch.softmax(router.weight_ED @ (r * module.router_norm.weight * D**-0.5), -1)
        top = torch.topk(probs, 2)
        weights = top.values / top.values.sum() * moe.expert_scale_E[top.indices]
        h = module.moe_norm(x)
        routed = sum(
            w * (apply_activation(Activation.GEGLU_TANH, h @ bank.w_in_EDH[e]) @ bank.w_out_EHD[e])
            for w, e in zip(weights, top.indices.tolist(), strict=True)
        )
        rows.append(dense + module.moe_out_norm(routed))
    return torch.stack(rows)


def test_dense_beside_moe_equals_a_loop_on_outputs_and_gradients(model):
    module = model.blocks[0].ffn
    module.train()
    x = torch.randn(2, 5, 32, requires_grad=True)
    got = module(x).output
    want = _reference(module, x.reshape(-1, 32)).reshape(2, 5, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(got)
    params = [x, *module.parameters()]
    grads = [torch.autograd.grad((y * weights).sum(), params) for y in (got, want)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cached_decoding_equals_the_full_forward(model):
    tokens = torch.randint(0, 64, (2, 12))
    full = model(tokens).logits
    cache = model.new_kv_cache(2)
    pieces = [model(tokens[:, :5], kv_cache=cache).logits]
    pieces += [model(tokens[:, t : t + 1], kv_cache=cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.keys[1].shape[1:] == (1, 32, 16)  # the global block's own cache shape


def test_padding_and_packing_change_no_other_sequence(model):
    tokens = torch.randint(0, 64, (2, 10))
    alone = model(tokens).logits
    padded = torch.cat([torch.randint(0, 64, (2, 3)), tokens], dim=1)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[:, :3] = False
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 3:], alone)
    segments = torch.tensor([[1] * 4 + [2] * 6] * 2)
    packed = model(tokens, segment_ids=segments).logits
    torch.testing.assert_close(packed[:, 4:], model(tokens[:, 4:]).logits)


def test_logits_are_soft_capped(model):
    assert model(torch.randint(0, 64, (1, 8))).logits.abs().max() < 5.0


def test_the_config_round_trips_and_params_count_what_the_model_stores(model):
    config = model.config
    assert config_from_dict(TransformerConfig, config_to_dict(config)) == config
    report = count_parameters(config)
    assert report.total == sum(p.numel() for p in model.parameters())
    # everything but the routed experts is active (the dense branch included)
    moe_free = report.total - report.breakdown["routed_experts"]
    assert report.active == moe_free + 4 * 2 * (32 * 2 * 12 + 12 * 32)  # k=2 experts per block


def test_refused_combinations_name_the_option():
    with pytest.raises(ValueError, match=r"token_mixers\.mixers\.global\.causal must be true"):
        gemma_like(
            token_mixers=TokenMixerLayout(
                pattern=["attention", "global"],
                mixers={"global": AttentionConfig(n_heads=4, causal=False)},
            )
        )
    with pytest.raises(ValueError, match=r"moe\.dense_beside routes on the block's input"):
        soft = MoEConfig(
            num_experts=4, top_k=1, experts=ExpertConfig(hidden=8), router=SoftRouterConfig()
        )
        MoEPlacementConfig(layer=soft, dense_beside=True)
    with pytest.raises(ValueError, match="rotated_fraction"):
        RopeScalingConfig(
            kind="proportional", factor=1.0, original_max_position_embeddings=8, rotated_fraction=2
        )


def test_the_example_trains_generates_and_evaluates(tmp_path, capsys):
    run = tmp_path / "gemma_like"
    config = ROOT / "examples" / "gemma4_like.toml"
    loaded = load_train_config(str(config))
    assert dataclasses.replace(loaded.model).moe.dense_beside
    args = ["train", "--config", str(config), "--set", "steps=3", "--set", "eval_batches=1"]
    assert main([*args, "--out-dir", str(run), "--quiet"]) == 0
    assert main(["generate", str(run), "--prompt", "The", "--max-new-tokens", "5"]) == 0
    assert main(["eval", str(run), "--batches", "1"]) == 0
    assert main(["params", str(run)]) == 0
    assert "dense_ffn" in capsys.readouterr().out
