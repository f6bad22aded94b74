"""LFM2-MoE (Liquid AI, ``lfm2_moe``: LFM2-8B-A1B and its kin) <-> moekit: a hybrid of **gated
short convolutions** (``layer_types`` ``"conv"``) and grouped-query attention with per-head
RMSNorm on queries and keys, dense SwiGLU FFNs in the first ``num_dense_layers`` blocks and MoE
layers after them: sigmoid scores with a selection-only expert bias (``use_expert_bias``),
renormalised top-k weights (``norm_topk_prob``, HF adds 1e-6 to the sum) times
``routed_scaling_factor``. The final norm is called ``embedding_norm``.
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
from moekit.models.common.layout import ATTENTION, TokenMixerLayout
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.mixers import ShortConvConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import Gating, TopKRouterConfig

MODEL_TYPE = "lfm2_moe"
CONV = "conv"  # the pattern's name for LFM2's short-convolution blocks


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    layer, hf = "blocks.{layer}", "model.layers.{layer}"
    attention, conv = common.attention_and_recurrent_blocks(config)
    entries: list[Entry] = [
        Rename("embed.weight", "model.embed_tokens.weight", layers="none"),
        Rename("norm.weight", "model.embedding_norm.weight", layers="none"),
        Rename(f"{layer}.attn_norm.weight", f"{hf}.operator_norm.weight"),
        Rename(f"{layer}.ffn_norm.weight", f"{hf}.ffn_norm.weight"),
    ]
    if not config.tie_embeddings:
        entries.append(Rename("lm_head.weight", "lm_head.weight", layers="none"))
    for ours, theirs in (
        ("q_proj", "q_proj"),
        ("k_proj", "k_proj"),
        ("v_proj", "v_proj"),
        ("o_proj", "out_proj"),
        ("q_norm", "q_layernorm"),
        ("k_norm", "k_layernorm"),
    ):
        entries.append(
            Rename(
                f"{layer}.attn.{ours}.weight", f"{hf}.self_attn.{theirs}.weight", layers=attention
            )
        )
    mixer = common.recurrent_mixer(config, ShortConvConfig, "LFM2-MoE")
    for part in ("in_proj", "conv", "out_proj"):
        names = ("weight", "bias") if mixer is not None and mixer.bias else ("weight",)
        for tensor in names:
            entries.append(
                Rename(f"{layer}.attn.{part}.{tensor}", f"{hf}.conv.{part}.{tensor}", layers=conv)
            )
    ffn = f"{hf}.feed_forward"
    entries += common.dense_ffn("blocks.{layer}.ffn", ffn, layers="dense", names=("w1", "w3", "w2"))
    entries.append(
        Rename("blocks.{layer}.ffn.router.weight_ED", f"{ffn}.gate.weight", layers="moe")
    )
    moe = config.moe.layer
    router = None if moe is None else cast(TopKRouterConfig, moe.router)
    if router is not None and router.bias_balancing:
        entries.append(
            Rename("blocks.{layer}.ffn.router.expert_bias_E", f"{ffn}.expert_bias", layers="moe")
        )
    experts = common.routed_experts(f"{ffn}.experts", names=("w1", "w3", "w2"))
    return {name: [*entries, *mapped] for name, mapped in experts.items()}


def _layer_types(value: Any) -> bool:
    if value is None:  # unset: every block attention
        return True
    return all(t in ("conv", "full_attention") for t in value)


HF_FIELDS = HFFields(
    mapped=(common.ATTENTION_HF_FIELDS - {"rms_norm_eps"})
    | {
        "norm_eps",
        "moe_intermediate_size",
        "num_experts",
        "num_experts_per_tok",
        "num_dense_layers",
        "use_expert_bias",
        "routed_scaling_factor",
        "norm_topk_prob",
        "conv_bias",
        "conv_L_cache",
        "layer_types",
    },
    fixed={"layer_types": (_layer_types,)},
)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "LFM2-MoE (lfm2_moe)", HF_FIELDS, strict)
    layer_types = hf.get("layer_types") or ["full_attention"] * hf["num_hidden_layers"]
    pattern = [ATTENTION if t == "full_attention" else CONV for t in layer_types]
    layout = TokenMixerLayout(
        pattern=pattern,
        mixers={
            CONV: ShortConvConfig(
                conv_width=hf.get("conv_L_cache", 3), bias=bool(hf.get("conv_bias", False))
            )
        },
    )
    fields = common.attention_fields(
        {**hf, "rms_norm_eps": hf.get("norm_eps", 1e-5)}, qk_norm=QKNorm.HEAD
    )
    fields["tie_embeddings"] = bool(hf.get("tie_word_embeddings", True))
    return TransformerConfig(
        **fields,
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.SWIGLU,
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=hf["num_experts"],
                top_k=hf["num_experts_per_tok"],
                experts=ExpertConfig(hidden=hf["moe_intermediate_size"]),
                router=TopKRouterConfig(
                    gating=Gating.SIGMOID_TOPK,
                    normalize_weights=bool(hf.get("norm_topk_prob", True)),
                    routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                    bias_balancing=bool(hf.get("use_expert_bias", True)),
                ),
                aux_loss=AuxLossConfig(switch=0.0),  # balanced by the expert bias
            ),
            first_dense=hf.get("num_dense_layers", 2) or 0,
        ),
        token_mixers=layout if CONV in pattern else None,
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    moe = common.moe_layer(config, "LFM2-MoE")
    router = cast(TopKRouterConfig, moe.router)
    mixer = common.recurrent_mixer(config, ShortConvConfig, "LFM2-MoE") or ShortConvConfig()
    attention = common.attention_to_hf(config)
    attention["norm_eps"] = attention.pop("rms_norm_eps")
    attention.pop("hidden_act", None)
    if common.softmax_attention(config, "LFM2-MoE").qk_norm is not QKNorm.HEAD:
        raise ValueError("an LFM2-MoE model has per-head RMSNorm on queries and keys")
    return {
        **attention,
        "architectures": ["Lfm2MoeForCausalLM"],
        "model_type": MODEL_TYPE,
        "intermediate_size": config.ffn_hidden,
        "moe_intermediate_size": moe.experts.hidden,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "num_dense_layers": config.moe.first_dense,
        "use_expert_bias": router.bias_balancing,
        "routed_scaling_factor": router.routed_scaling_factor,
        "norm_topk_prob": router.normalize_weights,
        "conv_bias": mixer.bias,
        "conv_L_cache": mixer.conv_width,
        "layer_types": [
            "full_attention" if config.is_attention_layer(i) else "conv"
            for i in range(config.n_layers)
        ],
    }
