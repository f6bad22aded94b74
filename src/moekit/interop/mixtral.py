"""Mixtral (Mistral AI) <-> moekit: config and weights.

HF keeps Mixtral experts per expert in checkpoints (``block_sparse_moe.experts.{e}.w1/w2/w3``,
gate ``w1``, down ``w2``, up ``w3``, each ``nn.Linear`` ``(out, in)``) and stacked in memory in
recent ``transformers`` (``mlp.experts.gate_up_proj`` ``(E, 2I, D)`` = ``[gate | up]``,
``mlp.experts.down_proj`` ``(E, D, I)``). moekit stores ``w_in_EDH`` ``(E, D, 2I)`` =
``[gate | up]`` and ``w_out_EHD`` ``(E, I, D)``.
"""

from __future__ import annotations

from typing import Any

import torch

from moekit.interop.keymap import Entry, Experts, Rename
from moekit.models.transformer.config import MoEPlacementConfig, TransformerConfig
from moekit.routing.config import RouterConfig

MODEL_TYPE = "mixtral"

_COMMON: list[Entry] = [
    Rename("embed.weight", "model.embed_tokens.weight", per_layer=False),
    Rename("blocks.{layer}.attn_norm.weight", "model.layers.{layer}.input_layernorm.weight"),
    Rename("blocks.{layer}.attn.q_proj.weight", "model.layers.{layer}.self_attn.q_proj.weight"),
    Rename("blocks.{layer}.attn.k_proj.weight", "model.layers.{layer}.self_attn.k_proj.weight"),
    Rename("blocks.{layer}.attn.v_proj.weight", "model.layers.{layer}.self_attn.v_proj.weight"),
    Rename("blocks.{layer}.attn.o_proj.weight", "model.layers.{layer}.self_attn.o_proj.weight"),
    Rename(
        "blocks.{layer}.ffn_norm.weight", "model.layers.{layer}.post_attention_layernorm.weight"
    ),
    Rename("norm.weight", "model.norm.weight", per_layer=False),
]
_HEAD = Rename("lm_head.weight", "lm_head.weight", per_layer=False)


def _per_expert_in(w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return torch.cat([w1.t(), w3.t()], dim=1)


def _per_expert_in_split(w_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = w_in.chunk(2, dim=1)
    return gate.t(), up.t()


CHECKPOINT_KEYMAP: list[Entry] = [
    *_COMMON,
    Rename(
        "blocks.{layer}.ffn.router.weight_ED", "model.layers.{layer}.block_sparse_moe.gate.weight"
    ),
    Experts(
        "blocks.{layer}.ffn.experts.w_in_EDH",
        (
            "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
            "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
        ),
        join=_per_expert_in,
        split=_per_expert_in_split,
    ),
    Experts(
        "blocks.{layer}.ffn.experts.w_out_EHD",
        ("model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",),
        join=lambda w2: w2.t(),
        split=lambda w_out: (w_out.t(),),
    ),
]

STACKED_KEYMAP: list[Entry] = [
    *_COMMON,
    Rename("blocks.{layer}.ffn.router.weight_ED", "model.layers.{layer}.mlp.gate.weight"),
    Experts(
        "blocks.{layer}.ffn.experts.w_in_EDH",
        ("model.layers.{layer}.mlp.experts.gate_up_proj",),
        join=lambda t: t.transpose(1, 2),
        split=lambda w: (w.transpose(1, 2),),
    ),
    Experts(
        "blocks.{layer}.ffn.experts.w_out_EHD",
        ("model.layers.{layer}.mlp.experts.down_proj",),
        join=lambda t: t.transpose(1, 2),
        split=lambda w: (w.transpose(1, 2),),
    ),
]


def keymaps(tied: bool) -> dict[str, list[Entry]]:
    head = [] if tied else [_HEAD]
    return {"checkpoint": CHECKPOINT_KEYMAP + head, "stacked": STACKED_KEYMAP + head}


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 1e6)))


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    """A moekit ``TransformerConfig`` equal to an HF ``MixtralConfig`` (as a dict)."""
    scaling = (hf.get("rope_parameters") or {}).get("rope_type", "default")
    if scaling not in ("default", None) or hf.get("rope_scaling"):
        raise ValueError(f"Mixtral rope scaling {scaling!r} is not supported yet")
    if hf.get("sliding_window"):
        raise ValueError("Mixtral sliding-window attention is not supported yet")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Mixtral hidden_act {hf['hidden_act']!r} is not supported")
    return TransformerConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        ffn_hidden=hf["intermediate_size"],
        activation="swiglu",
        max_seq_len=hf.get("max_position_embeddings", 4096),
        rope_theta=_rope_theta(hf),
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        moe=MoEPlacementConfig(
            num_experts=hf["num_local_experts"],
            top_k=hf["num_experts_per_tok"],
            expert_hidden=hf["intermediate_size"],
            router=RouterConfig(gating="softmax_topk", normalize_weights=True),
            aux_loss=_aux_loss(hf),
        ),
    )


def _aux_loss(hf: dict[str, Any]):
    from moekit.losses.config import AuxLossConfig

    # HF's router_aux_loss_coef multiplies a loss that is top_k times moekit's Switch loss
    return AuxLossConfig(switch=hf.get("router_aux_loss_coef", 0.02) * hf["num_experts_per_tok"])


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    """An HF ``MixtralConfig`` dict for a moekit config of the Mixtral shape."""
    moe = config.moe
    if not (moe.num_experts and moe.every == 1 and moe.first_dense == 0):
        raise ValueError("Mixtral export needs an MoE in every block (every=1, first_dense=0)")
    if moe.shared_experts is not None or moe.expert_hidden != config.ffn_hidden:
        raise ValueError("Mixtral export needs no shared experts and expert_hidden == ffn_hidden")
    router = moe.router
    if (
        router.kind.value != "top_k"
        or router.gating.value != "softmax_topk"
        or (not router.normalize_weights or router.bias or router.num_groups > 1)
    ):
        raise ValueError("Mixtral export needs a plain softmax top-k router with renormalisation")
    if config.activation.value != "swiglu":
        raise ValueError("Mixtral export needs activation='swiglu'")
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.aux_loss.switch / moe.top_k,
        "tie_word_embeddings": config.tie_embeddings,
        "sliding_window": None,
        "torch_dtype": "float32",
    }
