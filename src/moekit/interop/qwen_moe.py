"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE <-> moekit.

Qwen2-MoE: biases on q/k/v, routed experts of ``moe_intermediate_size``, one shared expert of
``shared_expert_intermediate_size`` scaled by ``sigmoid(shared_expert_gate(x))``, router
softmax-top-k renormalised only when ``norm_topk_prob``, an MoE every
``decoder_sparse_step`` blocks. Qwen3-MoE: no biases, per-head RMSNorm on queries and keys, no
shared expert. Experts: ``mlp.experts.{e}.{gate,up,down}_proj`` in checkpoints, stacked
``gate_up_proj``/``down_proj`` in memory; router ``mlp.gate``.
"""

from __future__ import annotations

from typing import Any, cast

from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.experts.shared import SharedExpertConfig
from moekit.interop import common
from moekit.interop.expressible import (
    HFFields,
    all_full_attention,
    any_value,
    check_hf_config,
    unset,
)
from moekit.interop.keymap import Entry, Rename
from moekit.layers import MoEConfig
from moekit.losses.config import AuxLossConfig
from moekit.models.common.attention import QKNorm
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import Gating, TopKRouterConfig


def keymaps(config: TransformerConfig, qwen3: bool) -> dict[str, list[Entry]]:
    mlp = "model.layers.{layer}.mlp"
    base = [
        *common.backbone(qkv_bias=not qwen3, qk_norm=qwen3, tied=config.tie_embeddings),
        Rename("blocks.{layer}.ffn.router.weight_ED", f"{mlp}.gate.weight", layers="moe"),
        *common.dense_ffn("blocks.{layer}.ffn", mlp, layers="dense"),
    ]
    if config.moe.layer is not None and config.moe.layer.shared_experts is not None:
        base += [
            *common.dense_ffn(
                "blocks.{layer}.ffn.shared_experts.ffn", f"{mlp}.shared_expert", layers="moe"
            ),
            Rename(
                "blocks.{layer}.ffn.shared_experts.gate.weight",
                f"{mlp}.shared_expert_gate.weight",
                layers="moe",
            ),
        ]
    experts = common.routed_experts(f"{mlp}.experts")
    return {name: [*base, *entries] for name, entries in experts.items()}


_QWEN_MAPPED = common.ATTENTION_HF_FIELDS | {
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "decoder_sparse_step",
    "norm_topk_prob",
}
_QWEN_FIXED = {
    "hidden_act": ("silu",),
    "use_sliding_window": (False, None),
    "sliding_window": (any_value,),  # unused without use_sliding_window
    "max_window_layers": (any_value,),
    "layer_types": (all_full_attention,),
    "mlp_only_layers": (unset,),
}
HF_FIELDS = {
    False: HFFields(
        mapped=_QWEN_MAPPED | {"shared_expert_intermediate_size"},
        fixed={**_QWEN_FIXED, "qkv_bias": (True,)},
    ),
    True: HFFields(mapped=_QWEN_MAPPED, fixed={**_QWEN_FIXED, "attention_bias": (False,)}),
}


def config_from_hf(hf: dict[str, Any], qwen3: bool, strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "Qwen3-MoE" if qwen3 else "Qwen2-MoE", HF_FIELDS[qwen3], strict)
    shared = hf.get("shared_expert_intermediate_size") or 0
    k = hf["num_experts_per_tok"]
    return TransformerConfig(
        **common.attention_fields(
            hf, qkv_bias=not qwen3, qk_norm=QKNorm.HEAD if qwen3 else QKNorm.NONE
        ),
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.SWIGLU,
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=hf.get("num_experts") or hf["num_local_experts"],
                top_k=k,
                experts=ExpertConfig(hidden=hf["moe_intermediate_size"]),
                router=TopKRouterConfig(
                    gating=Gating.SOFTMAX_TOPK,
                    normalize_weights=bool(hf.get("norm_topk_prob", False)),
                ),
                shared_experts=(
                    SharedExpertConfig(hidden=shared, gated=True) if shared and not qwen3 else None
                ),
                aux_loss=AuxLossConfig(switch=hf.get("router_aux_loss_coef", 0.001) * k),
            ),
            every=hf.get("decoder_sparse_step") or 1,
        ),
    )


def config_to_hf(config: TransformerConfig, qwen3: bool) -> dict[str, Any]:
    moe = common.moe_layer(config, "Qwen-MoE")
    router = cast(TopKRouterConfig, moe.router)  # export_problems checked the kind
    shared = moe.shared_experts
    out = {
        **common.attention_to_hf(config),
        "architectures": ["Qwen3MoeForCausalLM" if qwen3 else "Qwen2MoeForCausalLM"],
        "model_type": "qwen3_moe" if qwen3 else "qwen2_moe",
        "intermediate_size": config.ffn_hidden,
        "moe_intermediate_size": moe.experts.hidden,
        "num_experts": moe.num_experts,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": router.normalize_weights,
        "decoder_sparse_step": config.moe.every,
        "mlp_only_layers": [],
        "router_aux_loss_coef": moe.aux_loss.switch / moe.top_k,
        "use_sliding_window": False,
    }
    if not qwen3:
        out["shared_expert_intermediate_size"] = 0 if shared is None else shared.hidden
        out["qkv_bias"] = True
    return out
