"""Phi-3.5-MoE (Microsoft, ``phimoe``) <-> moekit: LayerNorm (with biases) before attention and
FFN and at the end, biases on every attention projection (``attention_bias``) and on the output
head (``lm_head_bias``), an optional sliding window on every layer, and an MoE in every block
routed by **SparseMixer** (GRIN, ``moekit.routing.sparsemixer``; ``router_jitter_noise`` is its
threshold, ``input_jitter_noise`` the training input jitter). Checkpoints keep Mixtral's layout
(``block_sparse_moe.gate``, ``experts.{e}.w1/w3/w2``).
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
from moekit.models.common.block import NormKind
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import SparseMixerRouterConfig

MODEL_TYPE = "phimoe"


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    bias = common.softmax_attention(config, "PhiMoE").qkv_bias
    layer, hf = "blocks.{layer}", "model.layers.{layer}"
    base: list[Entry] = [
        *common.backbone(qkv_bias=bias, o_bias=bias, tied=config.tie_embeddings),
        Rename(f"{layer}.attn_norm.bias", f"{hf}.input_layernorm.bias"),
        Rename(f"{layer}.ffn_norm.bias", f"{hf}.post_attention_layernorm.bias"),
        Rename("norm.bias", "model.norm.bias", layers="none"),
    ]
    if config.lm_head_bias:
        base.append(Rename("lm_head.bias", "lm_head.bias", layers="none"))
    legacy, stacked = f"{hf}.block_sparse_moe", f"{hf}.mlp"
    return {
        "checkpoint": [
            *base,
            Rename(f"{layer}.ffn.router.weight_ED", f"{legacy}.gate.weight", layers="moe"),
            *common.routed_experts(f"{legacy}.experts", names=("w1", "w3", "w2"))["checkpoint"],
        ],
        "stacked": [
            *base,
            Rename(f"{layer}.ffn.router.weight_ED", f"{stacked}.router.weight", layers="moe"),
            *common.routed_experts(f"{stacked}.experts")["stacked"],
        ],
    }


HF_FIELDS = HFFields(
    mapped=common.ATTENTION_HF_FIELDS
    | {
        "num_local_experts",
        "num_experts_per_tok",
        "attention_bias",
        "lm_head_bias",
        "sliding_window",
        "router_jitter_noise",
        "input_jitter_noise",
    },
    fixed={"hidden_act": ("silu",)},
)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "Phi-3.5-MoE", HF_FIELDS, strict)
    k = hf.get("num_experts_per_tok", 2)
    bias = bool(hf.get("attention_bias", False))
    return TransformerConfig(
        **common.attention_fields(
            {**hf, "rms_norm_eps": hf.get("rms_norm_eps", 1e-5)},
            qkv_bias=bias,
            o_bias=bias,
            sliding_window=hf.get("sliding_window") or 0,
        ),
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.SWIGLU,
        norm=NormKind.LAYER,
        lm_head_bias=bool(hf.get("lm_head_bias", False)),
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=hf.get("num_local_experts", 16),
                top_k=k,
                experts=ExpertConfig(hidden=hf["intermediate_size"]),
                router=SparseMixerRouterConfig(
                    jitter_eps=float(hf.get("router_jitter_noise", 0.01)),
                    input_jitter_eps=float(hf.get("input_jitter_noise", 0.0)),
                ),
                aux_loss=AuxLossConfig(switch=hf.get("router_aux_loss_coef", 0.001) * k),
            )
        ),
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    moe = common.moe_layer(config, "Phi-3.5-MoE")
    router = moe.router
    if not isinstance(router, SparseMixerRouterConfig):
        raise ValueError(
            f"Phi-3.5-MoE routes with SparseMixer, not moe.layer.router.kind={router.kind.value!r}"
        )
    return {
        **common.attention_to_hf(config),
        "architectures": ["PhimoeForCausalLM"],
        "model_type": MODEL_TYPE,
        "intermediate_size": moe.experts.hidden,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.aux_loss.switch / moe.top_k,
        "attention_bias": common.softmax_attention(config, "PhiMoE").qkv_bias,
        "lm_head_bias": config.lm_head_bias,
        "sliding_window": common.softmax_attention(config, "PhiMoE").sliding_window or None,
        "router_jitter_noise": router.jitter_eps,
        "input_jitter_noise": router.input_jitter_eps,
    }
