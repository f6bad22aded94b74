"""Hybrid models as configs (issue 31): a per-block token-mixer pattern mixing attention with
Gated DeltaNet, Mamba2 and short convolutions, decoding with every mixer's state, padding and
packing, files, accounting and the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moekit.analysis.params import count_parameters
from moekit.cli.main import main
from moekit.experts import ExpertConfig
from moekit.layers import MoEConfig
from moekit.models import TransformerConfig
from moekit.models.common.attention import AttentionConfig
from moekit.models.common.layout import TokenMixerLayout
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.mixers import GatedDeltaNetConfig, Mamba2Config, ShortConvConfig
from moekit.models.mixers.base import RecurrentMixer
from moekit.utils.serialization import config_from_dict, config_to_dict
from moekit.utils.validation import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def hybrid_config(**overrides) -> TransformerConfig:
    layout = TokenMixerLayout(
        pattern=["gdn", "mamba", "conv", "attention"],
        mixers={
            "gdn": GatedDeltaNetConfig(
                n_key_heads=2, n_value_heads=4, key_head_dim=8, value_head_dim=8, chunk=4
            ),
            "mamba": Mamba2Config(n_heads=4, head_dim=8, state_dim=8, chunk=4),
            "conv": ShortConvConfig(),
        },
    )
    options = dict(
        vocab_size=64,
        d_model=32,
        n_layers=4,
        ffn_hidden=48,
        attention=AttentionConfig(n_heads=4, n_kv_heads=2),
        moe=MoEPlacementConfig(
            layer=MoEConfig(num_experts=4, top_k=2, experts=ExpertConfig(hidden=16))
        ),
        token_mixers=layout,
    )
    return TransformerConfig(**{**options, **overrides})


@pytest.fixture
def model():
    torch.manual_seed(0)
    return hybrid_config().build().eval()


def test_the_pattern_builds_each_blocks_mixer(model):
    kinds = [type(block.attn).__name__ for block in model.blocks]
    assert kinds == ["GatedDeltaNet", "Mamba2", "ShortConv", "Attention"]
    assert sum(isinstance(b.attn, RecurrentMixer) for b in model.blocks) == 3


def test_cached_decoding_equals_the_full_forward(model):
    tokens = torch.randint(0, 64, (2, 12))
    full = model(tokens).logits
    cache = model.new_kv_cache(2)
    pieces = [model(tokens[:, :5], kv_cache=cache).logits]
    pieces += [model(tokens[:, t : t + 1], kv_cache=cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.values[0].dtype == torch.float32  # recurrent states stay float32


def test_padding_and_packed_sequences_change_no_other_sequence(model):
    tokens = torch.randint(0, 64, (2, 12))
    alone = model(tokens).logits
    padded = torch.cat([torch.randint(0, 64, (2, 3)), tokens], dim=1)
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[:, :3] = False
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 3:], alone)
    segments = torch.tensor([[1] * 5 + [2] * 7] * 2)
    packed = model(tokens, segment_ids=segments).logits
    torch.testing.assert_close(packed[:, :5], model(tokens[:, :5]).logits)
    torch.testing.assert_close(packed[:, 5:], model(tokens[:, 5:]).logits)


def test_the_config_round_trips_and_bad_layouts_are_named():
    config = hybrid_config()
    assert config_from_dict(TransformerConfig, config_to_dict(config)) == config
    data = config_to_dict(config)
    data["token_mixers"]["mixers"]["gdn"]["kind"] = "retnet"
    with pytest.raises(ConfigError, match=r"mixers\.gdn\.kind='retnet' is not a mixer"):
        config_from_dict(TransformerConfig, data)
    with pytest.raises(ValueError, match=r"pattern names \['lstm'\]"):
        TokenMixerLayout(pattern=["lstm", "attention"])


def test_params_counts_what_the_model_stores(model):
    report = count_parameters(model.config)
    assert report.total == sum(p.numel() for p in model.parameters())
    assert report.breakdown["recurrent_mixers"] > 0
    assert report.flops_per_token > 2 * report.active_non_embedding


def test_the_hybrid_example_trains_generates_and_evaluates(tmp_path, capsys, monkeypatch):
    run = tmp_path / "hybrid"
    config = ROOT / "examples" / "hybrid.toml"
    args = ["train", "--config", str(config), "--set", "steps=3", "--set", "eval_batches=1"]
    assert main([*args, "--out-dir", str(run), "--quiet"]) == 0
    assert main(["generate", str(run), "--prompt", "The", "--max-new-tokens", "5"]) == 0
    capsys.readouterr()
    greedy = [
        "generate",
        str(run),
        "--prompt",
        "The",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
    ]
    assert main(greedy) == 0
    expected = capsys.readouterr().out
    real_compile = torch.compile  # the graph without code generation (CPU test speed)
    monkeypatch.setattr(
        torch, "compile", lambda fn, **o: real_compile(fn, **{**o, "backend": "eager"})
    )
    torch._dynamo.reset()
    assert main([*greedy, "--compile-step"]) == 0
    assert capsys.readouterr().out == expected
    assert main(["eval", str(run), "--batches", "1"]) == 0
    assert main(["params", str(run)]) == 0
    assert "recurrent_mixers" in capsys.readouterr().out
