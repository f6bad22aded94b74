"""Hunyuan-MoE v1 (Tencent, ``hunyuan_v1_moe``) <-> moekit: grouped-query attention with
per-head RMSNorm on queries and keys *after* the rotation (``qk_norm='head_after_rope'``),
biases on every projection when ``attention_bias``; an MoE in every block: softmax top-k
renormalised (``mlp.gate.wg``), experts and one always-on shared FFN (``shared_mlp``), all of
``intermediate_size``. Per-layer expert counts or k (lists) are refused.
"""

from __future__ import annotations

from typing import Any

from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.experts.shared import SharedExpertConfig
from moekit.interop import common
from moekit.interop.expressible import HFFields, any_value, check_hf_config
from moekit.interop.keymap import Entry, Rename
from moekit.layers import MoEConfig
from moekit.losses.config import AuxLossConfig
from moekit.models.common.attention import QKNorm
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import Gating, TopKRouterConfig

MODEL_TYPE = "hunyuan_v1_moe"


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    bias = common.softmax_attention(config, "Hunyuan-MoE").qkv_bias
    layer, hf = "blocks.{layer}", "model.layers.{layer}"
    base = [
        *common.backbone(qkv_bias=bias, o_bias=bias, tied=config.tie_embeddings),
        Rename(f"{layer}.attn.q_norm.weight", f"{hf}.self_attn.query_layernorm.weight"),
        Rename(f"{layer}.attn.k_norm.weight", f"{hf}.self_attn.key_layernorm.weight"),
        Rename(f"{layer}.ffn.router.weight_ED", f"{hf}.mlp.gate.wg.weight", layers="moe"),
        *common.dense_ffn(f"{layer}.ffn.shared_experts.ffn", f"{hf}.mlp.shared_mlp", layers="moe"),
    ]
    experts = common.routed_experts(f"{hf}.mlp.experts")
    return {name: [*base, *entries] for name, entries in experts.items()}


def _integer(value: Any) -> bool:
    """an integer (one value for every layer)"""
    return isinstance(value, int) and not isinstance(value, bool)


HF_FIELDS = HFFields(
    mapped=common.ATTENTION_HF_FIELDS | {"num_experts", "moe_topk", "attention_bias"},
    fixed={
        "hidden_act": ("silu",),
        "pretraining_tp": (1,),
        "num_experts": (_integer,),
        "moe_topk": (_integer,),
        "eod_token_id": (any_value,),
        "sep_token_id": (any_value,),
    },
)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "Hunyuan-MoE", HF_FIELDS, strict)
    bias = bool(hf.get("attention_bias", False))
    width = hf["intermediate_size"]
    return TransformerConfig(
        **common.attention_fields(
            {**hf, "rms_norm_eps": hf.get("rms_norm_eps", 1e-5)},
            qk_norm=QKNorm.HEAD_AFTER_ROPE,
            qkv_bias=bias,
            o_bias=bias,
        ),
        ffn_hidden=width,
        activation=Activation.SWIGLU,
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=hf.get("num_experts", 1),
                top_k=hf.get("moe_topk", 1),
                experts=ExpertConfig(hidden=width),
                router=TopKRouterConfig(gating=Gating.SOFTMAX_TOPK, normalize_weights=True),
                shared_experts=SharedExpertConfig(hidden=width),
                aux_loss=AuxLossConfig(switch=0.01 * hf.get("moe_topk", 1)),
            )
        ),
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    moe = common.moe_layer(config, "Hunyuan-MoE")
    return {
        **common.attention_to_hf(config),
        "architectures": ["HunYuanMoEV1ForCausalLM"],
        "model_type": MODEL_TYPE,
        "intermediate_size": moe.experts.hidden,
        "num_experts": moe.num_experts,
        "moe_topk": moe.top_k,
        "attention_bias": common.softmax_attention(config, "Hunyuan-MoE").qkv_bias,
    }
