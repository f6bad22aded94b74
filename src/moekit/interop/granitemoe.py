"""Granite MoE (IBM, ``granitemoe`` and ``granitemoeshared``) <-> moekit: Llama-style attention
scaled by ``attention_multiplier`` instead of ``1/sqrt(head_dim)``, muP-style multipliers on the
embeddings (``embedding_multiplier``), on every block's outputs (``residual_multiplier``) and on
the logits (divided by ``logits_scaling``); an MoE in every block routed top-k on the logits then
softmax over those k (``topk_softmax``), experts stored stacked (``input_linear`` = ``[gate | up]``,
``output_linear``). ``granitemoeshared`` adds an always-on gated FFN (``shared_mlp``) of
``shared_intermediate_size``.
"""

from __future__ import annotations

from typing import Any

from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.experts.shared import SharedExpertConfig
from moekit.interop import common
from moekit.interop.expressible import HFFields, check_hf_config
from moekit.interop.keymap import Entry, Experts, Joined, Rename
from moekit.layers import MoEConfig
from moekit.losses.config import AuxLossConfig
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import Gating, TopKRouterConfig

MODEL_TYPE = "granitemoe"


def _t(w):
    return w.transpose(-1, -2)


def _t_split(w):
    return (w.transpose(-1, -2),)


def keymaps(config: TransformerConfig, shared: bool = False) -> dict[str, list[Entry]]:
    bias = common.softmax_attention(config, "GraniteMoE").qkv_bias
    moe, ours = "model.layers.{layer}.block_sparse_moe", "blocks.{layer}.ffn"
    base = common.backbone(qkv_bias=bias, o_bias=bias, tied=config.tie_embeddings)
    layer = config.moe.layer
    if shared and layer is not None and layer.shared_experts is not None:
        mlp = "model.layers.{layer}.shared_mlp"
        base = [
            *base,
            Joined(
                f"{ours}.shared_experts.ffn.w_in_DH",
                (f"{mlp}.input_linear.weight",),
                join=_t,
                split=_t_split,
                layers="moe",
            ),
            Rename(
                f"{ours}.shared_experts.ffn.w_out_HD",
                f"{mlp}.output_linear.weight",
                _t,
                _t,
                layers="moe",
            ),
        ]
    maps = {}
    for layout, (router, w_in, w_out) in {
        "checkpoint": ("router.layer.weight", "input_linear.weight", "output_linear.weight"),
        "stacked": ("router.weight", "experts.gate_up_proj", "experts.down_proj"),
    }.items():
        maps[layout] = [
            *base,
            Rename(f"{ours}.router.weight_ED", f"{moe}.{router}", layers="moe"),
            Experts(f"{ours}.experts.w_in_EDH", (f"{moe}.{w_in}",), join=_t, split=_t_split),
            Experts(f"{ours}.experts.w_out_EHD", (f"{moe}.{w_out}",), join=_t, split=_t_split),
        ]
    return maps


_MULTIPLIERS = {
    "embedding_multiplier",
    "residual_multiplier",
    "logits_scaling",
    "attention_multiplier",
}
HF_FIELDS = {
    False: HFFields(
        mapped=common.ATTENTION_HF_FIELDS
        | _MULTIPLIERS
        | {"num_local_experts", "num_experts_per_tok", "attention_bias"},
        fixed={"hidden_act": ("silu",)},
    ),
}
HF_FIELDS[True] = HFFields(
    mapped=HF_FIELDS[False].mapped | {"shared_intermediate_size"}, fixed=HF_FIELDS[False].fixed
)


def config_from_hf(
    hf: dict[str, Any], strict: bool = True, shared: bool = False
) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "GraniteMoeShared" if shared else "GraniteMoe", HF_FIELDS[shared], strict)
    k = hf.get("num_experts_per_tok", 2)
    width = hf["intermediate_size"]
    shared_width = (hf.get("shared_intermediate_size") or 0) if shared else 0
    bias = bool(hf.get("attention_bias", False))
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    scale: float | None = float(hf.get("attention_multiplier", 1.0))
    if scale == head_dim**-0.5:  # the usual scale: moekit's default
        scale = None
    return TransformerConfig(
        **common.attention_fields(
            hf,
            qkv_bias=bias,
            o_bias=bias,
            scale=scale,
        ),
        ffn_hidden=width,
        activation=Activation.SWIGLU,
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=hf.get("num_local_experts", 8),
                top_k=k,
                experts=ExpertConfig(hidden=width),
                router=TopKRouterConfig(gating=Gating.TOPK_SOFTMAX),
                shared_experts=SharedExpertConfig(hidden=shared_width) if shared_width else None,
                aux_loss=AuxLossConfig(switch=hf.get("router_aux_loss_coef", 0.001) * k),
            )
        ),
        embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
        logits_scaling=float(hf.get("logits_scaling", 1.0)),
    )


def config_to_hf(config: TransformerConfig, shared: bool = False) -> dict[str, Any]:
    moe = common.moe_layer(config, "GraniteMoe")
    out = {
        **common.attention_to_hf(config),
        "architectures": ["GraniteMoeSharedForCausalLM" if shared else "GraniteMoeForCausalLM"],
        "model_type": "granitemoeshared" if shared else MODEL_TYPE,
        "intermediate_size": moe.experts.hidden,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.aux_loss.switch / moe.top_k,
        "attention_bias": common.softmax_attention(config, "GraniteMoE").qkv_bias,
        "attention_multiplier": common.softmax_attention(config, "GraniteMoE").scale
        or config.head_width**-0.5,
        "embedding_multiplier": config.embedding_multiplier,
        "residual_multiplier": config.residual_multiplier,
        "logits_scaling": config.logits_scaling,
    }
    if shared:
        out["shared_intermediate_size"] = (
            0 if moe.shared_experts is None else moe.shared_experts.hidden
        )
    return out
