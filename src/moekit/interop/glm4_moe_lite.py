"""GLM-4.7-Flash (Zhipu AI, ``glm4_moe_lite``) <-> moekit: DeepSeek-V3's architecture, latent
attention (MLA, interleaved rotary by default) and the sigmoid router with a selection-only
correction bias, a shared expert and ``routed_scaling_factor``; the dense and MoE blocks are
listed per block (``mlp_layer_types``, dense first) instead of ``first_k_dense_replace``.
"""

from __future__ import annotations

from typing import Any

from moekit.interop import deepseek_v3
from moekit.interop.expressible import HFFields, check_hf_config
from moekit.interop.keymap import Entry
from moekit.models.transformer.model import TransformerConfig

MODEL_TYPE = "glm4_moe_lite"


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    return deepseek_v3.keymaps(config)


def _dense_first(value: Any) -> bool:
    """``mlp_layer_types`` moekit maps: some dense blocks, then sparse ones."""
    if value is None:  # unset: the family's default layout
        return True
    types = list(value)
    dense = types.count("dense")
    return set(types) <= {"dense", "sparse"} and types[:dense] == ["dense"] * dense


HF_FIELDS = HFFields(
    mapped=(deepseek_v3.HF_FIELDS.mapped - {"first_k_dense_replace"}) | {"mlp_layer_types"},
    fixed={**deepseek_v3.HF_FIELDS.fixed, "mlp_layer_types": (_dense_first,)},
)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "GLM-4.7-Flash (glm4_moe_lite)", HF_FIELDS, strict)
    n_layers = hf["num_hidden_layers"]
    types = hf.get("mlp_layer_types") or ["dense"] + ["sparse"] * (n_layers - 1)
    options = {k: v for k, v in hf.items() if k != "mlp_layer_types"}
    options["first_k_dense_replace"] = types.count("dense")
    return deepseek_v3.config_from_hf(options, strict=False)


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    out = deepseek_v3.config_to_hf(config)
    dense = out.pop("first_k_dense_replace")
    out.pop("topk_method", None)
    return {
        **out,
        "architectures": ["Glm4MoeLiteForCausalLM"],
        "model_type": MODEL_TYPE,
        "mlp_layer_types": ["dense"] * dense + ["sparse"] * (config.n_layers - dense),
    }
