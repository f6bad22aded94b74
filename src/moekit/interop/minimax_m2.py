"""MiniMax-M2 <-> moekit: grouped-query attention with RMSNorm over the whole query and key
projections, partial rotary positions (``rotary_dim`` / ``partial_rotary_factor``), and an MoE in
every block routed by sigmoid scores plus a selection-only correction bias
(``e_score_correction_bias``), top-k renormalised. Checkpoints keep Mixtral's layout
(``block_sparse_moe.experts.{e}.w1/w3/w2``); ``transformers`` stacks the experts in memory.
"""

from __future__ import annotations

from typing import Any

from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.interop import common
from moekit.interop.expressible import HFFields, check_hf_config
from moekit.interop.keymap import Entry, Rename
from moekit.layers import MoEConfig
from moekit.losses.config import AuxLossConfig
from moekit.models.common.attention import QKNorm
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import Gating, TopKRouterConfig

MODEL_TYPE = "minimax_m2"


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    base = common.backbone(qk_norm=True, tied=config.tie_embeddings)
    maps = {}
    for layout, block in (("checkpoint", "block_sparse_moe"), ("stacked", "mlp")):
        moe = f"model.layers.{{layer}}.{block}"
        experts = (
            common.routed_experts(f"{moe}.experts", names=("w1", "w3", "w2"))
            if layout == "checkpoint"
            else common.routed_experts(f"{moe}.experts")
        )
        maps[layout] = [
            *base,
            Rename("blocks.{layer}.ffn.router.weight_ED", f"{moe}.gate.weight", layers="moe"),
            Rename(
                "blocks.{layer}.ffn.router.expert_bias_E",
                f"{moe}.e_score_correction_bias",
                layers="moe",
            ),
            *experts[layout],
        ]
    return maps


HF_FIELDS = HFFields(
    mapped=common.ATTENTION_HF_FIELDS
    | {"num_local_experts", "num_experts_per_tok", "partial_rotary_factor", "rotary_dim"},
    fixed={"hidden_act": ("silu",)},
)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "MiniMax-M2", HF_FIELDS, strict)
    k = hf["num_experts_per_tok"]
    factor = common.partial_rotary_factor(hf)
    if hf.get("rotary_dim") and factor == 1.0:  # the released checkpoints' legacy field
        factor = hf["rotary_dim"] / (
            hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        )
    return TransformerConfig(
        **common.attention_fields(hf, qk_norm=QKNorm.FULL, partial_factor=factor),
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.SWIGLU,
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=hf["num_local_experts"],
                top_k=k,
                experts=ExpertConfig(hidden=hf["intermediate_size"]),
                router=TopKRouterConfig(
                    gating=Gating.SIGMOID_TOPK, normalize_weights=True, bias_balancing=True
                ),
                aux_loss=AuxLossConfig(switch=hf.get("router_aux_loss_coef", 0.001) * k),
            )
        ),
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    moe = common.moe_layer(config, "MiniMax-M2")
    return {
        **common.attention_to_hf(config),
        "architectures": ["MiniMaxM2ForCausalLM"],
        "model_type": MODEL_TYPE,
        "intermediate_size": moe.experts.hidden,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.aux_loss.switch / moe.top_k,
    }
