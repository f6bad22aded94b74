"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE <-> moekit.

Qwen2-MoE: biases on q/k/v, routed experts of ``moe_intermediate_size``, one shared expert of
``shared_expert_intermediate_size`` scaled by ``sigmoid(shared_expert_gate(x))``, router
softmax-top-k renormalised only when ``norm_topk_prob``, an MoE every
``decoder_sparse_step`` blocks. Qwen3-MoE: no biases, per-head RMSNorm on queries and keys, no
shared expert. Experts: ``mlp.experts.{e}.{gate,up,down}_proj`` in checkpoints, stacked
``gate_up_proj``/``down_proj`` in memory; router ``mlp.gate``.
"""

from __future__ import annotations

from typing import Any

from moekit.experts.activations import Activation
from moekit.experts.shared import SharedExpertConfig
from moekit.interop import common
from moekit.interop.keymap import Entry, Rename
from moekit.losses.config import AuxLossConfig
from moekit.models.transformer.config import MoEPlacementConfig, TransformerConfig
from moekit.routing.config import Gating, RouterConfig


def keymaps(config: TransformerConfig, qwen3: bool) -> dict[str, list[Entry]]:
    mlp = "model.layers.{layer}.mlp"
    base = [
        *common.backbone(qkv_bias=not qwen3, qk_norm=qwen3, tied=config.tie_embeddings),
        Rename("blocks.{layer}.ffn.router.weight_ED", f"{mlp}.gate.weight", layers="moe"),
        *common.dense_ffn("blocks.{layer}.ffn", mlp, layers="dense"),
    ]
    if config.moe.shared_experts is not None:
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


def config_from_hf(hf: dict[str, Any], qwen3: bool) -> TransformerConfig:
    if hf.get("mlp_only_layers"):
        raise ValueError("Qwen-MoE mlp_only_layers are not supported yet")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported")
    shared = hf.get("shared_expert_intermediate_size") or 0
    k = hf["num_experts_per_tok"]
    return TransformerConfig(
        **common.attention_fields(hf),
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.SWIGLU,
        qkv_bias=not qwen3,
        qk_norm="head" if qwen3 else "none",
        moe=MoEPlacementConfig(
            num_experts=hf.get("num_experts") or hf["num_local_experts"],
            top_k=k,
            expert_hidden=hf["moe_intermediate_size"],
            every=hf.get("decoder_sparse_step") or 1,
            router=RouterConfig(
                gating=Gating.SOFTMAX_TOPK, normalize_weights=bool(hf.get("norm_topk_prob", False))
            ),
            shared_experts=(
                SharedExpertConfig(hidden=shared, gated=True) if shared and not qwen3 else None
            ),
            aux_loss=AuxLossConfig(switch=hf.get("router_aux_loss_coef", 0.001) * k),
        ),
    )


def config_to_hf(config: TransformerConfig, qwen3: bool) -> dict[str, Any]:
    moe = config.moe
    router = moe.router
    if router.kind.value != "top_k" or router.gating.value != "softmax_topk" or router.bias:
        raise ValueError("Qwen-MoE export needs a softmax top-k router")
    if moe.first_dense or config.activation.value != "swiglu":
        raise ValueError("Qwen-MoE export needs first_dense=0 and swiglu")
    if config.qkv_bias != (not qwen3) or config.qk_norm != ("head" if qwen3 else "none"):
        raise ValueError("attention options do not match the Qwen-MoE family")
    shared = moe.shared_experts
    if qwen3 and shared is not None:
        raise ValueError("Qwen3-MoE has no shared expert")
    if shared is not None and not shared.gated:
        raise ValueError("Qwen2-MoE's shared expert is gated: SharedExpertConfig(gated=True)")
    out = {
        **common.attention_to_hf(config),
        "architectures": ["Qwen3MoeForCausalLM" if qwen3 else "Qwen2MoeForCausalLM"],
        "model_type": "qwen3_moe" if qwen3 else "qwen2_moe",
        "intermediate_size": config.ffn_hidden,
        "moe_intermediate_size": moe.expert_hidden,
        "num_experts": moe.num_experts,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": router.normalize_weights,
        "decoder_sparse_step": moe.every,
        "mlp_only_layers": [],
        "router_aux_loss_coef": moe.aux_loss.switch / moe.top_k,
        "use_sliding_window": False,
    }
    if not qwen3:
        out["shared_expert_intermediate_size"] = 0 if shared is None else shared.hidden
        out["qkv_bias"] = True
    return out
