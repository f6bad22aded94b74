"""OLMoE (AI2) <-> moekit: RMSNorm over the whole query and key projections, softmax top-k
(renormalised only when ``norm_topk_prob``), experts of ``intermediate_size``, no shared expert.
"""

from __future__ import annotations

from typing import Any, cast

from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.interop import common
from moekit.interop.expressible import HFFields, check_hf_config, unset
from moekit.interop.keymap import Entry, Rename
from moekit.layers import MoEConfig
from moekit.losses.config import AuxLossConfig
from moekit.models.common.attention import QKNorm
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import Gating, TopKRouterConfig

MODEL_TYPE = "olmoe"


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    mlp = "model.layers.{layer}.mlp"
    base = [
        *common.backbone(qk_norm=True, tied=config.tie_embeddings),
        Rename("blocks.{layer}.ffn.router.weight_ED", f"{mlp}.gate.weight", layers="moe"),
    ]
    experts = common.routed_experts(f"{mlp}.experts")
    return {name: [*base, *entries] for name, entries in experts.items()}


HF_FIELDS = HFFields(
    mapped=common.ATTENTION_HF_FIELDS | {"num_experts", "num_experts_per_tok", "norm_topk_prob"},
    fixed={"hidden_act": ("silu",), "clip_qkv": (unset,), "attention_bias": (False,)},
)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "OLMoE", HF_FIELDS, strict)
    k = hf["num_experts_per_tok"]
    return TransformerConfig(
        **common.attention_fields(
            {**hf, "rms_norm_eps": hf.get("rms_norm_eps", 1e-5)}, qk_norm=QKNorm.FULL
        ),
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.SWIGLU,
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=hf["num_experts"],
                top_k=k,
                experts=ExpertConfig(hidden=hf["intermediate_size"]),
                router=TopKRouterConfig(
                    gating=Gating.SOFTMAX_TOPK,
                    normalize_weights=bool(hf.get("norm_topk_prob", False)),
                ),
                aux_loss=AuxLossConfig(
                    switch=hf.get("router_aux_loss_coef", 0.01) * k,
                    z_loss=hf.get("router_z_loss_coef", 0.0),
                ),
            ),
        ),
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    moe = common.moe_layer(config, "OLMoE")
    return {
        **common.attention_to_hf(config),
        "architectures": ["OlmoeForCausalLM"],
        "model_type": MODEL_TYPE,
        "intermediate_size": moe.experts.hidden,  # every OLMoE layer is MoE
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": cast(TopKRouterConfig, moe.router).normalize_weights,
        "router_aux_loss_coef": moe.aux_loss.switch / moe.top_k,
        "router_z_loss_coef": moe.aux_loss.z_loss,
        "clip_qkv": None,
    }
