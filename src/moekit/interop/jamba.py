"""Jamba (AI21, ``jamba``; Lieber et al. 2024, arXiv 2403.19887) <-> moekit: blocks of the first
**Mamba** (a selective scan with per-channel, per-state decay and RMSNorms on its time step,
``B`` and ``C``: :class:`moekit.models.mixers.MambaConfig`) with an attention block every
``attn_layer_period`` (at ``attn_layer_offset``), the attention without positions (Jamba is
NoPE); a Mixtral-style MoE (softmax, top-k, weights *not* renormalised, SwiGLU experts as wide
as the dense FFN) every ``expert_layer_period`` blocks (at ``expert_layer_offset``), a dense
SwiGLU FFN elsewhere.
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
from moekit.models.common.attention import AttentionConfig
from moekit.models.common.layout import ATTENTION, TokenMixerLayout
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.mixers import MambaConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import Gating, TopKRouterConfig

MODEL_TYPE = "jamba"
MAMBA = "mamba"  # the pattern's name for the Mamba blocks
_MAMBA_TENSORS = (
    "in_proj.weight",
    "conv1d.weight",
    "x_proj.weight",
    "dt_proj.weight",
    "dt_proj.bias",
    "A_log",
    "D",
    "out_proj.weight",
)
_MAMBA_NORMS = ("dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight")


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    layer, hf = "blocks.{layer}", "model.layers.{layer}"
    attention, mamba = common.attention_and_recurrent_blocks(config)
    base: list[Entry] = [
        Rename("embed.weight", "model.embed_tokens.weight", layers="none"),
        Rename(f"{layer}.attn_norm.weight", f"{hf}.input_layernorm.weight"),
        Rename(f"{layer}.ffn_norm.weight", f"{hf}.pre_ff_layernorm.weight"),
        Rename("norm.weight", "model.final_layernorm.weight", layers="none"),
        *common.dense_ffn(f"{layer}.ffn", f"{hf}.feed_forward", layers="dense"),
    ]
    base += [
        Rename(f"{layer}.attn.{p}.weight", f"{hf}.self_attn.{p}.weight", layers=attention)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]
    mixer = common.recurrent_mixer(config, MambaConfig, "Jamba")
    if mixer is not None:
        names = list(_MAMBA_TENSORS)
        names += ["conv1d.bias"] if mixer.conv_bias else []
        names += ["in_proj.bias", "out_proj.bias"] if mixer.bias else []
        names += list(_MAMBA_NORMS) if mixer.inner_norms else []
        base += [Rename(f"{layer}.attn.{n}", f"{hf}.mamba.{n}", layers=mamba) for n in names]
    if not config.tie_embeddings:
        base.append(Rename("lm_head.weight", "lm_head.weight", layers="none"))
    router = f"{hf}.feed_forward.router.weight"
    per_expert = common.routed_experts(f"{hf}.feed_forward.experts")
    return {
        "checkpoint": [
            *base,
            Rename(f"{layer}.ffn.router.weight_ED", router, layers="moe"),
            *per_expert["checkpoint"],
        ],
        "stacked": [
            *base,
            Rename(f"{layer}.ffn.router.weight_ED", router, layers="moe"),
            *per_expert["stacked"],
        ],
    }


HF_FIELDS = HFFields(
    mapped=common.ATTENTION_HF_FIELDS
    | {
        "num_experts",
        "num_local_experts",
        "num_experts_per_tok",
        "router_aux_loss_coef",
        "expert_layer_period",
        "expert_layer_offset",
        "attn_layer_period",
        "attn_layer_offset",
        "mamba_d_state",
        "mamba_d_conv",
        "mamba_expand",
        "mamba_dt_rank",
        "mamba_conv_bias",
        "mamba_proj_bias",
        "use_mamba_kernels",
        "use_mambapy",
        "use_associative_scan",
    },
    fixed={"hidden_act": ("silu",)},
)


def _every(n_layers: int, period: int, offset: int) -> list[int]:
    return [i for i in range(n_layers) if i % period == offset]


def _period_of(blocks: list[int], n_layers: int, what: str) -> tuple[int, int]:
    """``(period, offset)`` with ``blocks == [i for i in range(n_layers) if i % period ==
    offset]``; refused by name when no such pair exists (Jamba places both by this rule)."""
    for period in range(1, n_layers + 1):
        for offset in range(period):
            if _every(n_layers, period, offset) == blocks:
                return period, offset
    raise ValueError(
        f"a Jamba model places its {what} blocks every n-th block from an offset; these are "
        f"blocks {blocks}"
    )


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "Jamba", HF_FIELDS, strict)
    n_layers = hf["num_hidden_layers"]
    fields = common.attention_fields(hf, rotary=False)
    attention = fields.pop("attention")
    assert isinstance(attention, AttentionConfig)
    attention_blocks = _every(
        n_layers, hf.get("attn_layer_period", 8), hf.get("attn_layer_offset", 4)
    )
    pattern = [ATTENTION if i in attention_blocks else MAMBA for i in range(n_layers)]
    rank = hf.get("mamba_dt_rank", "auto")
    mixer = MambaConfig(
        expand=hf.get("mamba_expand", 2),
        state_dim=hf.get("mamba_d_state", 16),
        conv_width=hf.get("mamba_d_conv", 4),
        dt_rank=0 if rank in ("auto", None) else int(rank),
        conv_bias=bool(hf.get("mamba_conv_bias", True)),
        bias=bool(hf.get("mamba_proj_bias", False)),
        inner_norms=True,
    )
    experts = hf.get("num_experts", hf.get("num_local_experts", 16))
    hidden = hf["intermediate_size"]
    moe = MoEPlacementConfig()
    if experts > 1:
        k = hf.get("num_experts_per_tok", 2)
        layer = MoEConfig(
            num_experts=experts,
            top_k=k,
            experts=ExpertConfig(hidden=hidden),
            router=TopKRouterConfig(gating=Gating.SOFTMAX_TOPK, normalize_weights=False),
            # HF's router_aux_loss_coef multiplies a loss k times moekit's Switch loss
            aux_loss=AuxLossConfig(switch=hf.get("router_aux_loss_coef", 0.001) * k),
        )
        moe_blocks = _every(
            n_layers, hf.get("expert_layer_period", 2), hf.get("expert_layer_offset", 1)
        )
        moe = MoEPlacementConfig(layer=layer, every=1, layers=moe_blocks) if moe_blocks else moe
    return TransformerConfig(
        **fields,
        attention=attention,
        ffn_hidden=hidden,
        activation=Activation.SWIGLU,
        moe=moe,
        token_mixers=TokenMixerLayout(pattern=pattern, mixers={MAMBA: mixer})
        if MAMBA in pattern
        else None,
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    """The HF config; whether it expresses ``config`` is checked by the round trip in
    ``moekit.interop.expressible``."""
    moe = common.moe_layer(config, "Jamba")
    n = config.n_layers
    attention_blocks, _ = common.attention_and_recurrent_blocks(config)
    attn_period, attn_offset = _period_of(list(attention_blocks), n, "attention")
    expert_period, expert_offset = _period_of(config.moe.moe_layer_indices(n), n, "MoE")
    mixer = common.recurrent_mixer(config, MambaConfig, "Jamba") or MambaConfig()
    out = common.attention_to_hf(config)
    for key in ("rope_theta", "rope_scaling", "rope_parameters"):
        out.pop(key, None)
    return {
        **out,
        "architectures": ["JambaForCausalLM"],
        "model_type": MODEL_TYPE,
        "intermediate_size": config.ffn_hidden,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.aux_loss.switch / moe.top_k,
        "expert_layer_period": expert_period,
        "expert_layer_offset": expert_offset,
        "attn_layer_period": attn_period,
        "attn_layer_offset": attn_offset,
        "mamba_d_state": mixer.state_dim,
        "mamba_d_conv": mixer.conv_width,
        "mamba_expand": mixer.expand,
        "mamba_dt_rank": mixer.rank(config.d_model),
        "mamba_conv_bias": mixer.conv_bias,
        "mamba_proj_bias": mixer.bias,
    }
