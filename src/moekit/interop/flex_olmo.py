"""FlexOlmo (AI2, ``flex_olmo``) <-> moekit: OLMo-2's **post-norm** blocks (each sublayer's
output is normalised before it joins the residual: ``x + norm(attn(x))``), RMSNorm over the whole
query and key projections, optional attention biases, and OLMoE's MoE in every block (softmax
top-k, renormalised when ``norm_topk_prob``).
"""

from __future__ import annotations

from typing import Any, cast

from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.interop import common
from moekit.interop.expressible import HFFields, check_hf_config
from moekit.interop.keymap import Entry, Rename
from moekit.layers import MoEConfig
from moekit.losses.config import AuxLossConfig
from moekit.models.common.attention import QKNorm
from moekit.models.common.block import NormPosition
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import Gating, TopKRouterConfig

MODEL_TYPE = "flex_olmo"


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    bias = common.softmax_attention(config, "FlexOlmo").qkv_bias
    mlp, hf = "model.layers.{layer}.mlp", "model.layers.{layer}"
    base = [
        entry
        for entry in common.backbone(
            qkv_bias=bias, o_bias=bias, qk_norm=True, tied=config.tie_embeddings
        )
        if not entry.moekit.endswith(("attn_norm.weight", "ffn_norm.weight"))
    ]
    base += [  # post-norm: the norms sit after each sublayer
        Rename("blocks.{layer}.attn_norm.weight", f"{hf}.post_attention_layernorm.weight"),
        Rename("blocks.{layer}.ffn_norm.weight", f"{hf}.post_feedforward_layernorm.weight"),
        Rename("blocks.{layer}.ffn.router.weight_ED", f"{mlp}.gate.weight", layers="moe"),
    ]
    experts = common.routed_experts(f"{mlp}.experts")
    return {name: [*base, *entries] for name, entries in experts.items()}


HF_FIELDS = HFFields(
    mapped=common.ATTENTION_HF_FIELDS
    | {"num_experts", "num_experts_per_tok", "norm_topk_prob", "attention_bias"},
    fixed={"hidden_act": ("silu",)},
)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "FlexOlmo", HF_FIELDS, strict)
    k = hf.get("num_experts_per_tok", 5)
    bias = bool(hf.get("attention_bias", False))
    return TransformerConfig(
        **common.attention_fields(hf, qk_norm=QKNorm.FULL, qkv_bias=bias, o_bias=bias),
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.SWIGLU,
        norm_position=NormPosition.POST,
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=hf.get("num_experts", 7),
                top_k=k,
                experts=ExpertConfig(hidden=hf["intermediate_size"]),
                router=TopKRouterConfig(
                    gating=Gating.SOFTMAX_TOPK,
                    normalize_weights=bool(hf.get("norm_topk_prob", False)),
                ),
                aux_loss=AuxLossConfig(switch=hf.get("router_aux_loss_coef", 0.01) * k),
            ),
        ),
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    moe = common.moe_layer(config, "FlexOlmo")
    return {
        **common.attention_to_hf(config),
        "architectures": ["FlexOlmoForCausalLM"],
        "model_type": MODEL_TYPE,
        "intermediate_size": moe.experts.hidden,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": cast(TopKRouterConfig, moe.router).normalize_weights,
        "router_aux_loss_coef": moe.aux_loss.switch / moe.top_k,
        "attention_bias": common.softmax_attention(config, "FlexOlmo").qkv_bias,
        "pad_token_id": None,  # transformers' default (100277) needs OLMo's vocabulary
    }
