"""dots.llm1 (rednote-hilab) <-> moekit: grouped-query attention with per-head RMSNorm on queries
and keys (biases on every projection when ``attention_bias``), and DeepSeek-V3's MoE: sigmoid
scores with a selection-only correction bias, top-2-sum group-limited top-k, optional
renormalisation times ``routed_scaling_factor``, ungated shared experts, dense FFNs in the first
``first_k_dense_replace`` blocks.
"""

from __future__ import annotations

from typing import Any

from moekit.experts.activations import Activation
from moekit.interop import common, deepseek_v3
from moekit.interop.expressible import HFFields, all_full_attention, any_value, check_hf_config
from moekit.interop.keymap import Entry
from moekit.models.common.attention import QKNorm
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.transformer.model import TransformerConfig

MODEL_TYPE = "dots1"

DEEPSEEK_MOE_FIELDS = frozenset(
    {
        "moe_intermediate_size",
        "n_routed_experts",
        "num_local_experts",
        "n_shared_experts",
        "num_experts_per_tok",
        "first_k_dense_replace",
        "norm_topk_prob",
        "routed_scaling_factor",
        "n_group",
        "topk_group",
    }
)


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    bias = common.softmax_attention(config, "dots1").qkv_bias
    base = [
        *common.backbone(qkv_bias=bias, o_bias=bias, qk_norm=True, tied=config.tie_embeddings),
        *deepseek_v3.moe_entries(config),
    ]
    experts = common.routed_experts("model.layers.{layer}.mlp.experts")
    return {name: [*base, *entries] for name, entries in experts.items()}


HF_FIELDS = HFFields(
    mapped=common.ATTENTION_HF_FIELDS | DEEPSEEK_MOE_FIELDS | {"attention_bias"},
    fixed={
        "hidden_act": ("silu",),
        "layer_types": (all_full_attention,),
        "sliding_window": (any_value,),  # unused while every layer is full attention
        "max_window_layers": (any_value,),
        "use_sliding_window": (False, None),
    },
)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "dots.llm1", HF_FIELDS, strict)
    bias = bool(hf.get("attention_bias", False))
    return TransformerConfig(
        **common.attention_fields(hf, qk_norm=QKNorm.HEAD, qkv_bias=bias, o_bias=bias),
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.SWIGLU,
        moe=MoEPlacementConfig(
            layer=deepseek_v3.moe_layer_from_hf(hf, "dots.llm1"),
            first_dense=hf.get("first_k_dense_replace") or 0,
        ),
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    attention = common.softmax_attention(config, "dots1")
    return {
        **common.attention_to_hf(config),
        **deepseek_v3.moe_layer_to_hf(config),
        "architectures": ["Dots1ForCausalLM"],
        "model_type": MODEL_TYPE,
        "attention_bias": attention.qkv_bias,
        "layer_types": ["full_attention"] * config.n_layers,
    }
