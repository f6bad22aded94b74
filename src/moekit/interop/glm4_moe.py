"""GLM-4.5 / GLM-4.6 (Zhipu AI, ``glm4_moe``) <-> moekit: grouped-query attention with biases on
queries, keys and values (``attention_bias``), optional per-head RMSNorm on queries and keys
(``use_qk_norm``), **partial rotary positions** (the first ``partial_rotary_factor`` of each
head rotates), and DeepSeek-V3's MoE (sigmoid scores with a selection-only correction bias,
group-limited top-k, ``routed_scaling_factor``, ungated shared experts, dense first blocks).
The checkpoints' multi-token-prediction layers (``num_nextn_predict_layers``) are not part of
the language model.
"""

from __future__ import annotations

from typing import Any

from moekit.experts.activations import Activation
from moekit.interop import common, deepseek_v3
from moekit.interop.dots1 import DEEPSEEK_MOE_FIELDS
from moekit.interop.expressible import HFFields, any_value, check_hf_config
from moekit.interop.keymap import Entry
from moekit.models.common.attention import QKNorm
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.transformer.model import TransformerConfig

MODEL_TYPE = "glm4_moe"


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    attention = common.softmax_attention(config, "GLM-4.5")
    base = [
        *common.backbone(
            qkv_bias=attention.qkv_bias,
            qk_norm=attention.qk_norm is QKNorm.HEAD,
            tied=config.tie_embeddings,
        ),
        *deepseek_v3.moe_entries(config),
    ]
    experts = common.routed_experts("model.layers.{layer}.mlp.experts")
    return {name: [*base, *entries] for name, entries in experts.items()}


HF_FIELDS = HFFields(
    mapped=common.ATTENTION_HF_FIELDS
    | DEEPSEEK_MOE_FIELDS
    | {"attention_bias", "use_qk_norm", "partial_rotary_factor"},
    fixed={
        "hidden_act": ("silu",),
        "num_mtp_layers": (any_value,),  # multi-token prediction: not in the LM
        "topk_method": ("noaux_tc", None),
    },
)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "GLM-4.5 (glm4_moe)", HF_FIELDS, strict)
    return TransformerConfig(
        **common.attention_fields(
            {**hf, "rms_norm_eps": hf.get("rms_norm_eps", 1e-5)},
            qk_norm=QKNorm.HEAD if hf.get("use_qk_norm") else QKNorm.NONE,
            qkv_bias=bool(hf.get("attention_bias", False)),
            partial_factor=common.partial_rotary_factor({"partial_rotary_factor": 0.5, **hf}),
        ),
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.SWIGLU,
        moe=MoEPlacementConfig(
            layer=deepseek_v3.moe_layer_from_hf(hf, "GLM-4.5"),
            first_dense=hf.get("first_k_dense_replace", 1) or 0,
        ),
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    attention = common.softmax_attention(config, "GLM-4.5")
    out = {
        **common.attention_to_hf(config),
        **deepseek_v3.moe_layer_to_hf(config),
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": MODEL_TYPE,
        "attention_bias": attention.qkv_bias,
        "use_qk_norm": attention.qk_norm is QKNorm.HEAD,
    }
    # GLM's default is 0.5: write the factor even when the whole head rotates
    out["rope_parameters"] = {
        **out["rope_parameters"],
        "partial_rotary_factor": common.rotated_share(attention),
    }
    out["partial_rotary_factor"] = common.rotated_share(attention)
    return out
