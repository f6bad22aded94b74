"""Granite-4.0-H (IBM, ``granitemoehybrid``) <-> moekit: Granite MoE with a shared FFN (see
``moekit.interop.granitemoe``: muP-style multipliers, ``attention_multiplier``, top-k-then-softmax
routing, stacked experts) whose token mixers are **Mamba2** (``layer_types``
``"linear_attention"``) or attention (``"full_attention"``), the attention without rotary
positions unless ``position_embedding_type = "rope"`` (Granite-4.0-H is NoPE).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moekit.interop import common, granitemoe
from moekit.interop.expressible import HFFields, check_hf_config
from moekit.interop.keymap import Entry, Rename
from moekit.models.common.layout import ATTENTION, TokenMixerLayout
from moekit.models.mixers import Mamba2Config
from moekit.models.transformer.model import TransformerConfig

MODEL_TYPE = "granitemoehybrid"
MAMBA = "linear_attention"  # the pattern's name for the Mamba2 blocks
_MAMBA_TENSORS = ("in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight")


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    maps = granitemoe.keymaps(config, shared=True)
    attention = tuple(i for i in range(config.n_layers) if config.is_attention_layer(i))
    mamba = tuple(i for i in range(config.n_layers) if i not in attention)
    mixer = common.recurrent_mixer(config, Mamba2Config, "Granite-4.0-H")
    extra: list[Entry] = []
    if mixer is not None:
        names = [*_MAMBA_TENSORS, "out_proj.weight"]
        names += ["conv1d.bias"] if mixer.conv_bias else []
        names += ["in_proj.bias", "out_proj.bias"] if mixer.bias else []
        extra = [
            Rename(f"blocks.{{layer}}.attn.{n}", f"model.layers.{{layer}}.mamba.{n}", layers=mamba)
            for n in names
        ]
    out = {}
    for name, entries in maps.items():
        kept: list[Entry] = []
        for entry in entries:
            if isinstance(entry, Rename) and ".attn." in entry.moekit:  # attention blocks only
                entry = dataclasses.replace(entry, layers=attention)
            kept.append(entry)
        out[name] = [*kept, *extra]
    return out


def _layer_types(value: Any) -> bool:
    if value is None:  # unset: the family's default layout
        return True
    return all(t in (MAMBA, "full_attention", "attention") for t in value)


HF_FIELDS = HFFields(
    mapped=granitemoe.HF_FIELDS[True].mapped
    | {
        "position_embedding_type",
        "layer_types",
        "mamba_n_heads",
        "mamba_n_groups",
        "mamba_d_state",
        "mamba_d_head",
        "mamba_d_conv",
        "mamba_expand",
        "mamba_chunk_size",
        "mamba_conv_bias",
        "mamba_proj_bias",
        "time_step_limit",
    },
    fixed={
        **granitemoe.HF_FIELDS[True].fixed,
        "layer_types": (_layer_types,),
        "position_embedding_type": (None, "rope", "nope"),
    },
)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "Granite-4.0-H (granitemoehybrid)", HF_FIELDS, strict)
    base = granitemoe.config_from_hf(hf, strict=False, shared=True)
    n_layers = hf["num_hidden_layers"]
    types = hf.get("layer_types") or [MAMBA] * n_layers
    pattern = [MAMBA if t == MAMBA else ATTENTION for t in types]
    heads = hf.get("mamba_n_heads", 128)
    inner = hf.get("mamba_expand", 2) * hf["hidden_size"]
    head_dim = hf.get("mamba_d_head", "auto")
    dt_min, dt_max = common.time_step_limits(hf)
    mixer = Mamba2Config(
        n_heads=heads,
        head_dim=inner // heads if head_dim in ("auto", None) else head_dim,
        state_dim=hf.get("mamba_d_state", 256),
        n_groups=hf.get("mamba_n_groups", 1),
        conv_width=hf.get("mamba_d_conv", 4),
        conv_bias=bool(hf.get("mamba_conv_bias", True)),
        bias=bool(hf.get("mamba_proj_bias", False)),
        dt_min=dt_min,
        dt_max=dt_max,
    )
    rotary = hf.get("position_embedding_type") == "rope"
    attention = common.softmax_attention(base, "Granite-4.0-H")
    if not rotary:
        attention = dataclasses.replace(attention, rope=None)
    return dataclasses.replace(
        base,
        attention=attention,
        token_mixers=TokenMixerLayout(pattern=pattern, mixers={MAMBA: mixer})
        if MAMBA in pattern
        else None,
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    out = granitemoe.config_to_hf(config, shared=True)
    mixer = common.recurrent_mixer(config, Mamba2Config, "Granite-4.0-H") or Mamba2Config()
    return {
        **out,
        "architectures": ["GraniteMoeHybridForCausalLM"],
        "model_type": MODEL_TYPE,
        "position_embedding_type": "rope" if config.attention.rope is not None else None,
        "layer_types": [
            "full_attention" if config.is_attention_layer(i) else MAMBA
            for i in range(config.n_layers)
        ],
        "mamba_n_heads": mixer.n_heads,
        "mamba_n_groups": mixer.n_groups,
        "mamba_d_state": mixer.state_dim,
        "mamba_d_head": mixer.head_dim,
        "mamba_d_conv": mixer.conv_width,
        "mamba_expand": mixer.inner // config.d_model,
        "mamba_chunk_size": mixer.chunk,
        "mamba_conv_bias": mixer.conv_bias,
        "mamba_proj_bias": mixer.bias,
        "time_step_limit": common.time_step_limit_to_hf(mixer),
    }
