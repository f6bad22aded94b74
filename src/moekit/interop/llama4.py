"""Llama 4 text models (Meta, ``llama4_text``: Scout, Maverick) <-> moekit.

Attention: grouped-query heads with rotary positions on complex pairs (imported through moekit's
rotate-half layout by de-interleaving each query/key head, as for ERNIE), a weightless per-head
RMSNorm on queries and keys after the rotation (``use_qk_norm``); iRoPE: the blocks listed as 0
in ``no_rope_layers`` have no positions (NoPE), see every earlier token and scale their queries
by the temperature ``1 + attn_scale * log(1 + floor((position + 1) / floor_scale))``; the other
blocks attend within chunks of ``attention_chunk_size`` positions. Llama 3 rotary scaling.

MoE in the blocks of ``moe_layers``: sigmoid of the top-k logits as the router score, applied to
each expert's **input** (``expert(score * x)``), plus an always-on shared expert of
``intermediate_size``; dense blocks use ``intermediate_size_mlp``. The experts are stored
stacked as ``gate_up_proj (E, D, 2H)`` and ``down_proj (E, H, D)`` (moekit's own layout).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moekit.dispatch.dispatcher import DispatchConfig
from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.experts.shared import SharedExpertConfig
from moekit.interop import common
from moekit.interop.ernie4_5_moe import deinterleave_heads, interleave_heads
from moekit.interop.expressible import HFFields, any_value, check_hf_config
from moekit.interop.keymap import Entry, Experts, Rename
from moekit.layers import MoEConfig
from moekit.losses.config import AuxLossConfig
from moekit.models.common.attention import AttentionConfig, QKNorm, QueryTemperatureConfig
from moekit.models.common.layout import ATTENTION, TokenMixerLayout
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import Gating, TopKRouterConfig

MODEL_TYPE = "llama4_text"


def _same(t):
    return t


def _one(t):
    return (t,)


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    head_dim = config.head_width
    layer, hf = "blocks.{layer}", "model.layers.{layer}"
    bias = common.softmax_attention(config, "Llama 4").qkv_bias
    entries: list[Entry] = [
        e
        for e in common.backbone(qkv_bias=bias, o_bias=bias, tied=config.tie_embeddings)
        if not e.moekit.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias"))
    ]
    for proj in ("q_proj", "k_proj"):
        for kind in ("weight", "bias") if bias else ("weight",):
            entries.append(
                Rename(
                    f"{layer}.attn.{proj}.{kind}",
                    f"{hf}.self_attn.{proj}.{kind}",
                    lambda w: deinterleave_heads(w, head_dim),
                    lambda w: interleave_heads(w, head_dim),
                )
            )
    ff = f"{hf}.feed_forward"
    entries += [
        *common.dense_ffn(f"{layer}.ffn", ff, layers="dense"),
        Rename(f"{layer}.ffn.router.weight_ED", f"{ff}.router.weight", layers="moe"),
        *common.dense_ffn(f"{layer}.ffn.shared_experts.ffn", f"{ff}.shared_expert", layers="moe"),
        Experts(f"{layer}.ffn.experts.w_in_EDH", (f"{ff}.experts.gate_up_proj",), _same, _one),
        Experts(f"{layer}.ffn.experts.w_out_EHD", (f"{ff}.experts.down_proj",), _same, _one),
    ]
    return {"checkpoint": entries}


def _rope_flags(value: Any) -> bool:
    """a list of 0/1 per layer"""
    return value is None or all(v in (0, 1) for v in value)


HF_FIELDS = HFFields(
    mapped=common.ATTENTION_HF_FIELDS
    | {
        "intermediate_size_mlp",
        "num_local_experts",
        "num_experts_per_tok",
        "moe_layers",
        "interleave_moe_layer_step",
        "use_qk_norm",
        "no_rope_layers",
        "no_rope_layer_interval",
        "attention_chunk_size",
        "attn_temperature_tuning",
        "floor_scale",
        "attn_scale",
        "attention_bias",
    },
    fixed={
        "hidden_act": ("silu",),
        "no_rope_layers": (_rope_flags,),
        # derived by transformers from no_rope_layers and attention_chunk_size
        "layer_types": (any_value,),
        "router_jitter_noise": (any_value,),
    },
)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "Llama 4", HF_FIELDS, strict)
    n = hf["num_hidden_layers"]
    interval = hf.get("no_rope_layer_interval", 4)
    flags = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    nope = [i for i, uses_rope in enumerate(flags) if not uses_rope]
    step = hf.get("interleave_moe_layer_step", 1)
    moe_layers = hf.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, n, step))
    k = hf.get("num_experts_per_tok", 1)
    bias = bool(hf.get("attention_bias", False))
    fields = common.attention_fields(
        {**hf, "rms_norm_eps": hf.get("rms_norm_eps", 1e-5)},
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=QKNorm.WEIGHTLESS if hf.get("use_qk_norm", True) else QKNorm.NONE,
        chunk_size=hf.get("attention_chunk_size") or 0,
    )
    return TransformerConfig(
        **fields,
        token_mixers=_nope_layout(hf, fields["attention"], nope),
        ffn_hidden=hf.get("intermediate_size_mlp", 16384),
        activation=Activation.SWIGLU,
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=hf.get("num_local_experts", 16),
                top_k=k,
                experts=ExpertConfig(hidden=hf["intermediate_size"]),
                router=TopKRouterConfig(gating=Gating.SIGMOID_TOPK, normalize_weights=False),
                dispatch=DispatchConfig(weight_input=True),
                shared_experts=SharedExpertConfig(hidden=hf["intermediate_size"]),
                aux_loss=AuxLossConfig(switch=hf.get("router_aux_loss_coef", 0.001) * k),
            ),
            layers=sorted(moe_layers),
        ),
    )


def _nope_layout(
    hf: dict[str, Any], attention: AttentionConfig, nope: list[int]
) -> TokenMixerLayout | None:
    """iRoPE as a layer pattern: the NoPE blocks get their own attention (no rotation, no
    chunks, no query/key norm, the query temperature when tuned); ``None`` without them."""
    if not nope:
        return None
    tuning = bool(hf.get("attn_temperature_tuning", True))
    temperature = QueryTemperatureConfig(
        floor_scale=int(hf.get("floor_scale", 8192)), scale=float(hf.get("attn_scale", 0.1))
    )
    nope_attention = dataclasses.replace(
        attention,
        rope=None,
        chunk_size=0,
        qk_norm=QKNorm.NONE,
        query_temperature=temperature if tuning else None,
    )
    pattern = ["nope" if i in nope else ATTENTION for i in range(hf["num_hidden_layers"])]
    return TokenMixerLayout(pattern=pattern, mixers={"nope": nope_attention})


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    moe = common.moe_layer(config, "Llama 4")
    attention = common.softmax_attention(config, "Llama 4")
    layers = [config.attention_of_layer(i) for i in range(config.n_layers)]
    nope = {i for i, layer in enumerate(layers) if layer.rope is None}
    temperature = next(
        (t for layer in layers if (t := getattr(layer, "query_temperature", None)) is not None),
        None,
    )
    return {
        **common.attention_to_hf(config),
        "architectures": ["Llama4ForCausalLM"],
        "model_type": MODEL_TYPE,
        "intermediate_size": moe.experts.hidden,
        "intermediate_size_mlp": config.ffn_hidden,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_layers": config.moe.moe_layer_indices(config.n_layers),
        "use_qk_norm": attention.qk_norm is QKNorm.WEIGHTLESS,
        "no_rope_layers": [0 if i in nope else 1 for i in range(config.n_layers)],
        "attention_chunk_size": attention.chunk_size or None,
        "attn_temperature_tuning": temperature is not None,
        "floor_scale": 8192 if temperature is None else temperature.floor_scale,
        "attn_scale": 0.1 if temperature is None else temperature.scale,
        "attention_bias": attention.qkv_bias,
        "router_aux_loss_coef": moe.aux_loss.switch / moe.top_k,
    }
