"""ERNIE-4.5 MoE (Baidu, ``ernie4_5_moe``) <-> moekit: grouped-query attention with
**interleaved** rotary positions (pairs ``(x_2i, x_2i+1)`` rotate together), an MoE in the blocks
``moe_layer_start_index .. moe_layer_end_index`` every ``moe_layer_interval``: float32 softmax
scores, experts chosen by ``score + e_score_correction_bias`` (selection only), weights
renormalised; ungated shared experts of ``moe_num_shared_experts * moe_intermediate_size``.

Interleaved rotation of queries and keys equals the rotate-half rotation of the same vectors with
each head's dimensions de-interleaved (even ones first): the scores ``q . k`` are unchanged. So
the import permutes the rows of ``q_proj`` and ``k_proj`` (per head) and moekit's attention runs
as is; export permutes them back.
"""

from __future__ import annotations

from typing import Any

import torch

from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.experts.shared import SharedExpertConfig
from moekit.interop import common
from moekit.interop.expressible import HFFields, any_value, check_hf_config
from moekit.interop.keymap import Entry, Rename
from moekit.layers import MoEConfig
from moekit.losses.config import AuxLossConfig
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import Gating, TopKRouterConfig

MODEL_TYPE = "ernie4_5_moe"


def deinterleave_heads(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a query/key projection ``(heads * head_dim, D)`` with each head's dimensions
    reordered even-first (``0, 2, 4, ..., 1, 3, 5, ...``)."""
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    shape = weight.shape
    return weight.reshape(-1, head_dim, *shape[1:])[:, order].reshape(shape)


def interleave_heads(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of :func:`deinterleave_heads`."""
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    inverse = torch.argsort(order)
    shape = weight.shape
    return weight.reshape(-1, head_dim, *shape[1:])[:, inverse].reshape(shape)


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    head_dim = config.head_width
    layer, hf = "blocks.{layer}", "model.layers.{layer}.self_attn"
    base: list[Entry] = [
        entry
        for entry in common.backbone(tied=config.tie_embeddings)
        if not entry.moekit.endswith(("q_proj.weight", "k_proj.weight"))
    ]
    for proj in ("q_proj", "k_proj"):
        base.append(
            Rename(
                f"{layer}.attn.{proj}.weight",
                f"{hf}.{proj}.weight",
                lambda w: deinterleave_heads(w, head_dim),
                lambda w: interleave_heads(w, head_dim),
            )
        )
    mlp = "model.layers.{layer}.mlp"
    base += [
        Rename(f"{layer}.ffn.router.weight_ED", f"{mlp}.gate.weight", layers="moe"),
        *common.dense_ffn(f"{layer}.ffn", mlp, layers="dense"),
    ]
    moe = config.moe.layer
    if moe is not None and moe.shared_experts is not None:
        base += common.dense_ffn(f"{layer}.ffn.shared_experts.ffn", f"{mlp}.shared_experts", "moe")
    experts = common.routed_experts(f"{mlp}.experts")
    maps = {}
    for layout, statics in (("checkpoint", "moe_statics"), ("stacked", "gate.moe_statics")):
        bias = Rename(
            f"{layer}.ffn.router.expert_bias_E",
            f"{mlp}.{statics}.e_score_correction_bias",
            lambda b: b.reshape(-1),
            lambda b: b.reshape(1, -1),
            layers="moe",
        )
        maps[layout] = [*base, bias, *experts[layout]]
    return maps


HF_FIELDS = HFFields(
    mapped=common.ATTENTION_HF_FIELDS
    | {
        "moe_intermediate_size",
        "moe_k",
        "moe_num_experts",
        "moe_num_shared_experts",
        "moe_layer_start_index",
        "moe_layer_end_index",
        "moe_layer_interval",
    },
    fixed={
        "hidden_act": ("silu",),
        "use_bias": (False, None),
        "moe_norm_min": (any_value,),  # the renormalisation's floor (1e-12)
        "num_mtp_layers": (any_value,),  # multi-token prediction: not in the LM
    },
)


def moe_blocks(hf: dict[str, Any]) -> list[int]:
    n = hf["num_hidden_layers"]
    start = hf.get("moe_layer_start_index", 1)
    end = hf.get("moe_layer_end_index", -1)
    end = n - 1 if end in (-1, None) else end
    interval = hf.get("moe_layer_interval", 1) or 1
    return [i for i in range(n) if (i + 1) % interval == 0 and start <= i <= end]


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "ERNIE-4.5-MoE", HF_FIELDS, strict)
    k = hf.get("moe_k", 6)
    shared = (hf.get("moe_num_shared_experts") or 0) * hf["moe_intermediate_size"]
    return TransformerConfig(
        **common.attention_fields(
            {
                **hf,
                "rms_norm_eps": hf.get("rms_norm_eps", 1e-5),
                "tie_word_embeddings": hf.get("tie_word_embeddings", True),
            }
        ),
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.SWIGLU,
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=hf.get("moe_num_experts", 64),
                top_k=k,
                experts=ExpertConfig(hidden=hf["moe_intermediate_size"]),
                router=TopKRouterConfig(
                    gating=Gating.SOFTMAX_TOPK, normalize_weights=True, bias_balancing=True
                ),
                shared_experts=SharedExpertConfig(hidden=shared) if shared else None,
                aux_loss=AuxLossConfig(switch=hf.get("router_aux_loss_coef", 0.001) * k),
            ),
            layers=moe_blocks(hf),
        ),
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    moe = common.moe_layer(config, "ERNIE-4.5-MoE")
    blocks = config.moe.moe_layer_indices(config.n_layers)
    shared = moe.shared_experts
    return {
        **common.attention_to_hf(config),
        "architectures": ["Ernie4_5_MoeForCausalLM"],
        "model_type": MODEL_TYPE,
        "intermediate_size": config.ffn_hidden,
        "moe_intermediate_size": moe.experts.hidden,
        "moe_num_experts": moe.num_experts,
        "moe_k": moe.top_k,
        "moe_num_shared_experts": 0 if shared is None else shared.hidden // moe.experts.hidden,
        # a contiguous run of MoE blocks (anything else does not survive the round trip)
        "moe_layer_start_index": blocks[0] if blocks else config.n_layers,
        "moe_layer_end_index": blocks[-1] if blocks else config.n_layers,
        "moe_layer_interval": 1,
        "router_aux_loss_coef": moe.aux_loss.switch / moe.top_k,
        "use_bias": False,
    }
