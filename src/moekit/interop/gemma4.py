"""Gemma 4 (Google, ``gemma4_text``; the text model of ``gemma4``, e.g. gemma-4-26B-A4B) <->
moekit.

What the text model needs, each a moekit option:

* sandwich blocks (``NormPosition.SANDWICH``: a norm before and after each sublayer) whose
  output the stored ``layer_scalar`` multiplies (``TransformerConfig.layer_scalars``);
* sliding-window layers (the model's ``attention``) and global layers with their own head width,
  key/value heads and **proportional** rotary positions (a ``TokenMixerLayout`` attention entry,
  ``RopeScalingConfig(kind="proportional")``); every layer has per-head q/k RMSNorms before the
  rotation, values RMS-normed without weight (``values="normed"``), logits unscaled
  (``scale=1``); with ``attention_k_eq_v`` the global layers' values are their keys
  (``values="keys"``: no ``v_proj``);
* a dense GeGLU-tanh FFN **beside** the MoE layer (``MoEPlacementConfig.dense_beside``), each
  branch with its own norms, the router reading the block's input through its own RMS norm and
  learned scale (``DenseBesideMoE.router_norm``); a learned per-expert scale multiplies the
  renormalised top-k weights (``MoEConfig.expert_scales``);
* embeddings scaled by ``sqrt(hidden_size)``, logits soft-capped
  (``final_logit_softcapping``).

Refused by name: per-layer input embeddings (``hidden_size_per_layer_input``, the small E2B/E4B
models), key/value sharing across layers (``num_kv_shared_layers``), bidirectional attention.
A ``gemma4`` (multimodal) checkpoint loads its text model and warns with what it left out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.interop import common
from moekit.interop.expressible import HFFields, any_value, check_hf_config
from moekit.interop.keymap import Entry, Rename
from moekit.layers import MoEConfig
from moekit.models.common.attention import AttentionConfig, QKNorm, ValueSource
from moekit.models.common.block import NormPosition
from moekit.models.common.layout import ATTENTION, TokenMixerLayout
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.common.rotary import RopeScalingConfig, RotaryConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import Gating, TopKRouterConfig

MODEL_TYPE = "gemma4_text"
MULTIMODAL_MODEL_TYPE = "gemma4"
GLOBAL = "global"  # the pattern's name for the full-attention layers
SLIDING_TYPE, FULL_TYPE = "sliding_attention", "full_attention"
_PREFIX = "model.language_model."
_LEFT_OUT = {
    "model.vision_tower.": "the vision tower",
    "model.embed_vision.": "the vision embedder",
    "model.audio_tower.": "the audio tower",
    "model.embed_audio.": "the audio embedder",
}


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The text model's config of a ``gemma4`` checkpoint (a ``gemma4_text`` one unchanged)."""
    text = hf.get("text_config")
    if text is None:
        return hf
    return {
        **text,
        "model_type": MODEL_TYPE,
        "tie_word_embeddings": hf.get("tie_word_embeddings", text.get("tie_word_embeddings", True)),
    }


def checkpoint_state(hf: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text model's tensors of a ``gemma4`` checkpoint, warning with what was left out."""
    return common.text_model_state(state, _PREFIX, _LEFT_OUT, "Gemma 4")


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    layer, hf = "blocks.{layer}", "model.layers.{layer}"
    entries: list[Entry] = [
        Rename("embed.weight", "model.embed_tokens.weight", layers="none"),
        Rename("norm.weight", "model.norm.weight", layers="none"),
        Rename(f"{layer}.attn_norm.weight", f"{hf}.input_layernorm.weight"),
        Rename(f"{layer}.attn_post_norm.weight", f"{hf}.post_attention_layernorm.weight"),
        Rename(f"{layer}.ffn_post_norm.weight", f"{hf}.post_feedforward_layernorm.weight"),
        Rename(f"{layer}.layer_scalar", f"{hf}.layer_scalar"),
    ]
    projections = ["q_proj", "k_proj", "o_proj", "q_norm", "k_norm"]
    for name in projections:
        entries.append(Rename(f"{layer}.attn.{name}.weight", f"{hf}.self_attn.{name}.weight"))
    with_values = tuple(
        i
        for i in range(config.n_layers)
        if getattr(config.token_mixer_of_layer(i), "values", None) != ValueSource.KEYS
    )
    entries.append(
        Rename(f"{layer}.attn.v_proj.weight", f"{hf}.self_attn.v_proj.weight", layers=with_values)
    )
    attention = common.softmax_attention(config, "Gemma 4")
    if attention.qkv_bias:
        for name in ("q_proj", "k_proj"):
            entries.append(Rename(f"{layer}.attn.{name}.bias", f"{hf}.self_attn.{name}.bias"))
        entries.append(
            Rename(f"{layer}.attn.v_proj.bias", f"{hf}.self_attn.v_proj.bias", layers=with_values)
        )
    if attention.o_bias:
        entries.append(Rename(f"{layer}.attn.o_proj.bias", f"{hf}.self_attn.o_proj.bias"))
    # dense blocks: the FFN and its pre-norm; MoE blocks: both branches and their norms
    entries += [
        Rename(
            f"{layer}.ffn_norm.weight", f"{hf}.pre_feedforward_layernorm.weight", layers="dense"
        ),
        *common.dense_ffn(f"{layer}.ffn", f"{hf}.mlp", layers="dense"),
        *common.dense_ffn(f"{layer}.ffn.dense", f"{hf}.mlp", layers="moe"),
    ]
    for ours, theirs in (
        ("dense_norm", "pre_feedforward_layernorm"),
        ("dense_out_norm", "post_feedforward_layernorm_1"),
        ("moe_norm", "pre_feedforward_layernorm_2"),
        ("moe_out_norm", "post_feedforward_layernorm_2"),
    ):
        entries.append(Rename(f"{layer}.ffn.{ours}.weight", f"{hf}.{theirs}.weight", layers="moe"))
    entries += [
        Rename(f"{layer}.ffn.moe.router.weight_ED", f"{hf}.router.proj.weight", layers="moe"),
        Rename(f"{layer}.ffn.router_norm.weight", f"{hf}.router.scale", layers="moe"),
        Rename(f"{layer}.ffn.moe.expert_scale_E", f"{hf}.router.per_expert_scale", layers="moe"),
        *common.routed_experts(f"{hf}.experts", prefix=f"{layer}.ffn.moe.experts")["stacked"],
    ]
    if not config.tie_embeddings:
        entries.append(Rename("lm_head.weight", "lm_head.weight", layers="none"))
    return {"stacked": entries}


def _no_per_layer_inputs(value: Any) -> bool:
    return not value


def _none(value: Any) -> bool:
    return value is None


HF_FIELDS = HFFields(
    mapped=common.ATTENTION_HF_FIELDS
    | {
        "hidden_activation",
        "rope_parameters",
        "attention_bias",
        "sliding_window",
        "layer_types",
        "final_logit_softcapping",
        "per_layer_config",
        "global_head_dim",
        "num_global_key_value_heads",
        "attention_k_eq_v",
        "enable_moe_block",
        "num_experts",
        "top_k_experts",
        "moe_intermediate_size",
        "hidden_size_per_layer_input",
        "vocab_size_per_layer_input",
        "num_kv_shared_layers",
        "use_double_wide_mlp",
        "use_bidirectional_attention",
    },
    fixed={
        "hidden_activation": ("gelu_pytorch_tanh",),
        "hidden_size_per_layer_input": (_no_per_layer_inputs,),
        "num_kv_shared_layers": (0, None),
        "use_bidirectional_attention": (_none,),
        "vocab_size_per_layer_input": (any_value,),
    },
)


def _rotary(params: dict[str, Any] | None, max_positions: int) -> RotaryConfig:
    """One layer type's rope parameters."""
    params = dict(params or {})
    theta = float(params.get("rope_theta", 10000.0))
    kind = params.get("rope_type", "default")
    if kind == "default" and params.get("partial_rotary_factor", 1.0) == 1.0:
        return RotaryConfig(theta=theta)
    if kind not in ("default", "proportional"):
        raise ValueError(
            f"Gemma 4 rope_parameters rope_type={kind!r} is not supported (default and "
            "proportional are)"
        )
    scaling = RopeScalingConfig(
        kind="proportional",
        factor=float(params.get("factor", 1.0)),
        original_max_position_embeddings=max_positions,
        rotated_fraction=float(params.get("partial_rotary_factor", 1.0)),
    )
    return RotaryConfig(theta=theta, scaling=scaling)


def _global_shape(hf: dict[str, Any], types: list[str]) -> tuple[int, int]:
    """The global layers' ``(head_dim, key/value heads)``: ``per_layer_config`` (what
    ``transformers`` writes; every global layer alike) or ``global_head_dim`` /
    ``num_global_key_value_heads`` (what a published config says)."""
    k_eq_v = bool(hf.get("attention_k_eq_v", False))
    kv_heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    overrides = hf.get("per_layer_config")
    if overrides:
        shapes = {
            (o.get("head_dim", hf.get("head_dim")), o.get("num_key_value_heads", kv_heads))
            for o in overrides.values()
        }
        if len(shapes) != 1 or {int(i) for i in overrides} != {
            i for i, t in enumerate(types) if t == FULL_TYPE
        }:
            raise ValueError(
                "Gemma 4 per_layer_config must give every full_attention layer, and only them, "
                f"the same head_dim and num_key_value_heads; got {overrides}"
            )
        return shapes.pop()
    head_dim = hf.get("global_head_dim", 512)
    global_kv = hf.get("num_global_key_value_heads")
    return head_dim, (global_kv if k_eq_v and global_kv else kv_heads)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    hf = text_config(hf)
    check_hf_config(hf, "Gemma 4 (gemma4_text)", HF_FIELDS, strict)
    n_layers = hf["num_hidden_layers"]
    max_positions = hf.get("max_position_embeddings", 131072)
    types = list(hf.get("layer_types") or [])
    if not types:
        types = [SLIDING_TYPE if (i + 1) % 6 else FULL_TYPE for i in range(n_layers)]
    unknown = sorted(set(types) - {SLIDING_TYPE, FULL_TYPE})
    if unknown:
        raise ValueError(f"Gemma 4 layer_types {unknown} are not supported")
    rope = hf.get("rope_parameters") or {}
    bias = bool(hf.get("attention_bias", False))
    base = dict(
        n_heads=hf["num_attention_heads"],
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=QKNorm.HEAD,
        scale=1.0,
    )
    sliding = AttentionConfig(
        **base,
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim", 256),
        rope=_rotary(rope.get(SLIDING_TYPE), max_positions),
        values=ValueSource.NORMED,
        sliding_window=hf.get("sliding_window", 512),
    )
    head_dim, kv_heads = _global_shape(hf, types)
    keys_as_values = bool(hf.get("attention_k_eq_v", False))
    full = AttentionConfig(
        **base,
        n_kv_heads=kv_heads,
        head_dim=head_dim,
        rope=_rotary(rope.get(FULL_TYPE), max_positions),
        values=ValueSource.KEYS if keys_as_values else ValueSource.NORMED,
    )
    pattern = [ATTENTION if t == SLIDING_TYPE else GLOBAL for t in types]
    moe = MoEPlacementConfig()
    if hf.get("enable_moe_block", False):
        moe = MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=hf["num_experts"],
                top_k=hf["top_k_experts"],
                experts=ExpertConfig(
                    hidden=hf["moe_intermediate_size"], activation=Activation.GEGLU_TANH
                ),
                router=TopKRouterConfig(gating=Gating.SOFTMAX_TOPK, normalize_weights=True),
                expert_scales=True,
            ),
            dense_beside=True,
        )
    return TransformerConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=n_layers,
        attention=sliding,
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.GEGLU_TANH,
        max_seq_len=max_positions,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        moe=moe,
        embedding_multiplier=math.sqrt(hf["hidden_size"]),
        norm_position=NormPosition.SANDWICH,
        token_mixers=TokenMixerLayout(pattern=pattern, mixers={GLOBAL: full})
        if GLOBAL in pattern
        else None,
        layer_scalars=True,
        logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
    )


def _global_of(config: TransformerConfig) -> AttentionConfig | None:
    layout = config.token_mixers
    if layout is None:
        return None
    variants = {
        layout.name_of_layer(i): common.softmax_attention(
            dataclasses.replace(config, attention=variant), "Gemma 4"
        )
        for i in range(config.n_layers)
        if (variant := layout.attention_variant_of_layer(i)) is not None
    }
    if len(variants) > 1:
        raise ValueError(
            f"a Gemma 4 model has one global attention config, this one has {variants}"
        )
    return next(iter(variants.values()), None)


def _rope_to_hf(attention: AttentionConfig) -> dict[str, Any]:
    rope = attention.rope or RotaryConfig()
    scaling = rope.scaling
    if scaling is None:
        return {"rope_type": "default", "rope_theta": rope.theta}
    return {
        "rope_type": "proportional",
        "partial_rotary_factor": scaling.rotated_fraction,
        "rope_theta": rope.theta,
        **({} if scaling.factor == 1.0 else {"factor": scaling.factor}),
    }


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    """The HF config; whether it expresses ``config`` is checked by the round trip in
    ``moekit.interop.expressible``."""
    moe = common.moe_layer(config, "Gemma 4")
    sliding = common.softmax_attention(config, "Gemma 4")
    full = _global_of(config) or dataclasses.replace(sliding, sliding_window=0)
    keys_as_values = full.values == ValueSource.KEYS
    types = [
        FULL_TYPE
        if config.token_mixers is not None
        and config.token_mixers.attention_variant_of_layer(i) is not None
        else SLIDING_TYPE
        for i in range(config.n_layers)
    ]
    return {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": sliding.n_heads,
        "num_key_value_heads": sliding.kv_heads,
        "head_dim": sliding.head_dim,
        "global_head_dim": full.head_dim,
        "num_global_key_value_heads": full.kv_heads if keys_as_values else None,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_parameters": {SLIDING_TYPE: _rope_to_hf(sliding), FULL_TYPE: _rope_to_hf(full)},
        "attention_bias": sliding.qkv_bias,
        "sliding_window": sliding.sliding_window,
        "layer_types": types,
        "final_logit_softcapping": config.logit_softcap or None,
        "hidden_size_per_layer_input": 0,
        "attention_k_eq_v": keys_as_values,
        "num_kv_shared_layers": 0,
        "enable_moe_block": True,
        "num_experts": moe.num_experts,
        "top_k_experts": moe.top_k,
        "moe_intermediate_size": moe.experts.hidden,
        "torch_dtype": "float32",
    }
