"""Mixtral (Mistral AI) <-> moekit: config translation and key maps.

Checkpoints keep experts per expert (``block_sparse_moe.experts.{e}.w1/w3/w2`` = gate, up,
down); recent ``transformers`` keeps them stacked in memory (``mlp.experts.gate_up_proj``,
``mlp.experts.down_proj``). Router: softmax, top-k, renormalised.
"""

from __future__ import annotations

from typing import Any

from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.interop import common
from moekit.interop.expressible import HFFields, check_hf_config, unset
from moekit.interop.keymap import Entry, Rename
from moekit.layers import MoEConfig
from moekit.losses.config import AuxLossConfig
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import Gating, TopKRouterConfig

MODEL_TYPE = "mixtral"


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    base = common.backbone(tied=config.tie_embeddings)
    legacy = "model.layers.{layer}.block_sparse_moe"
    experts = common.routed_experts(f"{legacy}.experts", names=("w1", "w3", "w2"))
    stacked = common.routed_experts("model.layers.{layer}.mlp.experts")
    return {
        "checkpoint": [
            *base,
            Rename("blocks.{layer}.ffn.router.weight_ED", f"{legacy}.gate.weight", layers="moe"),
            *experts["checkpoint"],
        ],
        "stacked": [
            *base,
            Rename(
                "blocks.{layer}.ffn.router.weight_ED",
                "model.layers.{layer}.mlp.gate.weight",
                layers="moe",
            ),
            *stacked["stacked"],
        ],
    }


HF_FIELDS = HFFields(
    mapped=common.ATTENTION_HF_FIELDS | {"num_local_experts", "num_experts_per_tok"},
    fixed={"hidden_act": ("silu",), "sliding_window": (unset,)},
)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "Mixtral", HF_FIELDS, strict)
    k = hf["num_experts_per_tok"]
    return TransformerConfig(
        **common.attention_fields({**hf, "rms_norm_eps": hf.get("rms_norm_eps", 1e-5)}),
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.SWIGLU,
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=hf["num_local_experts"],
                top_k=k,
                experts=ExpertConfig(hidden=hf["intermediate_size"]),
                router=TopKRouterConfig(gating=Gating.SOFTMAX_TOPK, normalize_weights=True),
                # HF's router_aux_loss_coef multiplies a loss k times moekit's Switch loss
                aux_loss=AuxLossConfig(switch=hf.get("router_aux_loss_coef", 0.02) * k),
            ),
        ),
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    """The HF config; whether it expresses ``config`` is checked by the round trip in
    ``moekit.interop.expressible``."""
    moe = common.moe_layer(config, "Mixtral")
    return {
        **common.attention_to_hf(config),
        "architectures": ["MixtralForCausalLM"],
        "model_type": MODEL_TYPE,
        "intermediate_size": moe.experts.hidden,  # every Mixtral layer is MoE
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.aux_loss.switch / moe.top_k,
        "sliding_window": None,
    }
