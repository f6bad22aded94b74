"""Qwen3-Next (``qwen3_next``: Qwen3-Next-80B-A3B) <-> moekit: a hybrid of **Gated DeltaNet**
blocks (``layer_types`` ``"linear_attention"``) and **gated attention** (``q_proj`` also computes
a per-head output gate; per-head RMSNorm on queries and keys; partial rotary positions, 0.25 by
default), with Qwen2-MoE's MoE (softmax top-k, a shared expert scaled by
``sigmoid(shared_expert_gate(x))``). Its RMSNorms scale by ``1 + weight`` (stored zero-centred);
moekit stores ``1 + weight`` as transformers computes it (in float32), and exports ``w - 1``,
which is exact for every stored scale ``>= 0.5``, so both directions compute the same. The
gated DeltaNet projections are stored grouped by key head (``[q k v z]`` of each group in
``in_proj_qkvz``, ``[b a]`` in ``in_proj_ba``); moekit's are grouped by kind.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.experts.shared import SharedExpertConfig
from moekit.interop import common
from moekit.interop.expressible import HFFields, any_value, check_hf_config, unset
from moekit.interop.keymap import Entry, Rename
from moekit.layers import MoEConfig
from moekit.losses.config import AuxLossConfig
from moekit.models.common.attention import QKNorm
from moekit.models.common.layout import ATTENTION, TokenMixerLayout
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.mixers import GatedDeltaNetConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import Gating, TopKRouterConfig

MODEL_TYPE = "qwen3_next"
LINEAR = "linear_attention"  # the pattern's name for the Gated DeltaNet blocks


def _plus_one(w: torch.Tensor) -> torch.Tensor:
    return w + 1.0


def _minus_one(w: torch.Tensor) -> torch.Tensor:
    return w - 1.0


def gated_deltanet_of(
    config: TransformerConfig, family: str = "Qwen3-Next"
) -> GatedDeltaNetConfig | None:
    """The Gated DeltaNet config of the model's recurrent blocks (``None``: attention only)."""
    return common.recurrent_mixer(config, GatedDeltaNetConfig, family)


def _grouped_layout(mixer: GatedDeltaNetConfig):
    """Functions between HF's per-key-head grouping and moekit's per-kind one."""
    Hk, K, V = mixer.n_key_heads, mixer.key_head_dim, mixer.value_head_dim
    r = mixer.n_value_heads // Hk

    def qkvz_to_moekit(w: torch.Tensor) -> torch.Tensor:
        parts = w.view(Hk, 2 * K + 2 * r * V, -1).split([K, K, r * V, r * V], dim=1)
        return torch.cat([p.reshape(-1, w.shape[-1]) for p in parts])

    def qkvz_to_hf(w: torch.Tensor) -> torch.Tensor:
        parts = w.split([Hk * K, Hk * K, Hk * r * V, Hk * r * V])
        return torch.cat([p.view(Hk, -1, w.shape[-1]) for p in parts], dim=1).reshape_as(w)

    def ba_to_moekit(w: torch.Tensor) -> torch.Tensor:
        b, a = w.view(Hk, 2 * r, -1).split([r, r], dim=1)
        return torch.cat([b.reshape(-1, w.shape[-1]), a.reshape(-1, w.shape[-1])])

    def ba_to_hf(w: torch.Tensor) -> torch.Tensor:
        b, a = w.chunk(2)
        grouped = [b.view(Hk, r, -1), a.view(Hk, r, -1)]
        return torch.cat(grouped, dim=1).reshape_as(w)

    return qkvz_to_moekit, qkvz_to_hf, ba_to_moekit, ba_to_hf


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    layer, hf = "blocks.{layer}", "model.layers.{layer}"
    attention, linear = common.attention_and_recurrent_blocks(config)
    entries: list[Entry] = [
        Rename("embed.weight", "model.embed_tokens.weight", layers="none"),
        Rename("norm.weight", "model.norm.weight", _plus_one, _minus_one, layers="none"),
        Rename(f"{layer}.attn_norm.weight", f"{hf}.input_layernorm.weight", _plus_one, _minus_one),
        Rename(
            f"{layer}.ffn_norm.weight",
            f"{hf}.post_attention_layernorm.weight",
            _plus_one,
            _minus_one,
        ),
    ]
    if not config.tie_embeddings:
        entries.append(Rename("lm_head.weight", "lm_head.weight", layers="none"))
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        ours, theirs = f"{layer}.attn.{proj}.weight", f"{hf}.self_attn.{proj}.weight"
        entries.append(Rename(ours, theirs, layers=attention))
    for norm in ("q_norm", "k_norm"):
        ours, theirs = f"{layer}.attn.{norm}.weight", f"{hf}.self_attn.{norm}.weight"
        entries.append(Rename(ours, theirs, _plus_one, _minus_one, layers=attention))
    mixer = gated_deltanet_of(config)
    if mixer is not None:
        qkvz_in, qkvz_out, ba_in, ba_out = _grouped_layout(mixer)
        lin = f"{hf}.linear_attn"
        entries += [
            Rename(
                f"{layer}.attn.in_proj_qkvz.weight",
                f"{lin}.in_proj_qkvz.weight",
                qkvz_in,
                qkvz_out,
                layers=linear,
            ),
            Rename(
                f"{layer}.attn.in_proj_ba.weight",
                f"{lin}.in_proj_ba.weight",
                ba_in,
                ba_out,
                layers=linear,
            ),
        ]
        for name in ("conv1d.weight", "dt_bias", "A_log", "norm.weight", "out_proj.weight"):
            entries.append(Rename(f"{layer}.attn.{name}", f"{lin}.{name}", layers=linear))
    mlp = f"{hf}.mlp"
    entries += [
        Rename("blocks.{layer}.ffn.router.weight_ED", f"{mlp}.gate.weight", layers="moe"),
        *common.dense_ffn("blocks.{layer}.ffn", mlp, layers="dense"),
    ]
    moe = config.moe.layer
    if moe is not None and moe.shared_experts is not None:
        entries += [
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
    return {name: [*entries, *mapped] for name, mapped in experts.items()}


def _layer_types(value: Any) -> bool:
    if value is None:  # unset: the family's default layout
        return True
    return all(t in (LINEAR, "full_attention") for t in value)


HF_FIELDS = HFFields(
    mapped=common.ATTENTION_HF_FIELDS
    | {
        "partial_rotary_factor",
        "linear_conv_kernel_dim",
        "linear_key_head_dim",
        "linear_value_head_dim",
        "linear_num_key_heads",
        "linear_num_value_heads",
        "decoder_sparse_step",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "num_experts_per_tok",
        "num_experts",
        "norm_topk_prob",
        "router_aux_loss_coef",
        "layer_types",
        "full_attention_interval",
    },
    fixed={
        "hidden_act": ("silu",),
        "attention_bias": (False,),
        "mlp_only_layers": (unset,),
        "layer_types": (_layer_types,),
        "attention_dropout": (any_value,),
    },
)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "Qwen3-Next (qwen3_next)", HF_FIELDS, strict)
    n_layers = hf["num_hidden_layers"]
    interval = hf.get("full_attention_interval", 4)
    layer_types = hf.get("layer_types") or [
        LINEAR if (i + 1) % interval else "full_attention" for i in range(n_layers)
    ]
    pattern = [ATTENTION if t == "full_attention" else LINEAR for t in layer_types]
    mixer = GatedDeltaNetConfig(
        n_key_heads=hf.get("linear_num_key_heads", 16),
        n_value_heads=hf.get("linear_num_value_heads", 32),
        key_head_dim=hf.get("linear_key_head_dim", 128),
        value_head_dim=hf.get("linear_value_head_dim", 128),
        conv_width=hf.get("linear_conv_kernel_dim", 4),
    )
    shared = hf.get("shared_expert_intermediate_size") or 0
    k = hf["num_experts_per_tok"]
    fields = common.attention_fields(
        {"head_dim": 256, **hf},
        qk_norm=QKNorm.HEAD,
        output_gate=True,
        partial_factor=common.partial_rotary_factor({"partial_rotary_factor": 0.25, **hf}),
    )
    return TransformerConfig(
        **fields,
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.SWIGLU,
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=hf["num_experts"],
                top_k=k,
                experts=ExpertConfig(hidden=hf["moe_intermediate_size"]),
                router=TopKRouterConfig(
                    gating=Gating.SOFTMAX_TOPK,
                    normalize_weights=bool(hf.get("norm_topk_prob", True)),
                ),
                shared_experts=SharedExpertConfig(hidden=shared, gated=True) if shared else None,
                aux_loss=AuxLossConfig(switch=hf.get("router_aux_loss_coef", 0.001) * k),
            ),
            every=hf.get("decoder_sparse_step") or 1,
        ),
        token_mixers=TokenMixerLayout(pattern=pattern, mixers={LINEAR: mixer})
        if LINEAR in pattern
        else None,
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    moe = common.moe_layer(config, "Qwen3-Next")
    router = cast(TopKRouterConfig, moe.router)
    shared = moe.shared_experts
    mixer = gated_deltanet_of(config) or GatedDeltaNetConfig()
    return {
        **common.attention_to_hf(config),
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": MODEL_TYPE,
        "partial_rotary_factor": common.rotated_share(
            common.softmax_attention(config, "Qwen3-Next")
        ),
        "intermediate_size": config.ffn_hidden,
        "moe_intermediate_size": moe.experts.hidden,
        "shared_expert_intermediate_size": 0 if shared is None else shared.hidden,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": router.normalize_weights,
        "decoder_sparse_step": config.moe.every,
        "mlp_only_layers": [],
        "router_aux_loss_coef": moe.aux_loss.switch / moe.top_k,
        "attention_bias": False,
        "linear_conv_kernel_dim": mixer.conv_width,
        "linear_key_head_dim": mixer.key_head_dim,
        "linear_value_head_dim": mixer.value_head_dim,
        "linear_num_key_heads": mixer.n_key_heads,
        "linear_num_value_heads": mixer.n_value_heads,
        "layer_types": [
            "full_attention" if config.is_attention_layer(i) else LINEAR
            for i in range(config.n_layers)
        ],
    }
