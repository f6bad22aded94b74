"""Qwen3.5-MoE and Qwen3.6-MoE (``qwen3_5_moe``: Qwen3.6-35B-A3B, Qwen3.5-35B/122B/397B) <->
moekit, the text model: Qwen3-Next's architecture (Gated DeltaNet 3:1 with gated attention,
zero-centred RMSNorms, a gated shared expert) with the Gated DeltaNet projections stored apart
(``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``) and an MoE in every block.

The published checkpoints are vision-language models (``Qwen3_5MoeForConditionalGeneration``):
their ``text_config`` and ``model.language_model.*`` tensors are the text model; the vision
tower (``model.visual.*``) and the multi-token-prediction head (``mtp.*``) are left out, and
:func:`text_checkpoint` says so. Exports are text-only (``qwen3_5_moe_text``, loaded by
``Qwen3_5MoeForCausalLM``). The rotary positions are the text case of its multimodal rotary
(the three position streams are equal for text).
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import torch

from moekit.interop import common, qwen3_next
from moekit.interop.expressible import HFFields, any_value, check_hf_config
from moekit.interop.keymap import Entry, Joined, Rename
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import TopKRouterConfig

MODEL_TYPE = "qwen3_5_moe"
TEXT_MODEL_TYPE = "qwen3_5_moe_text"
_PREFIX = "model.language_model."
_LEFT_OUT = {"model.visual.": "the vision tower", "mtp.": "the multi-token-prediction head"}


def text_checkpoint(
    hf: dict[str, Any], state: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """The text model's config and tensors of a vision-language checkpoint (unchanged for a
    text-only one), warning with what was left out."""
    text = hf.get("text_config")
    if text is not None:
        hf = {
            **text,
            "model_type": MODEL_TYPE,
            "tie_word_embeddings": hf.get(
                "tie_word_embeddings", text.get("tie_word_embeddings", False)
            ),
        }
    if state is None:
        return hf, None
    return hf, common.text_model_state(state, _PREFIX, _LEFT_OUT, "Qwen3.5-MoE")


def checkpoint_state(hf: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text model's tensors (see :func:`text_checkpoint`); what ``from_hf`` calls."""
    _, kept = text_checkpoint(hf, state)
    assert kept is not None
    return kept


def _rows_joined(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts)


def _rows_split(first: int, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return w[:first], w[first:]


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    maps = qwen3_next.keymaps(config)
    mixer = qwen3_next.gated_deltanet_of(config, "Qwen3.5-MoE")
    _, linear = common.attention_and_recurrent_blocks(config)
    out = {}
    for name, entries in maps.items():
        kept: list[Entry] = [
            e
            for e in entries
            if not (isinstance(e, Rename) and e.hf.endswith(("in_proj_qkvz.weight", "ba.weight")))
        ]
        if mixer is not None:
            lin = "model.layers.{layer}.linear_attn"
            qkv = 2 * mixer.n_key_heads * mixer.key_head_dim + mixer.n_value_heads * (
                mixer.value_head_dim
            )
            heads = mixer.n_value_heads
            kept += [
                Joined(
                    "blocks.{layer}.attn.in_proj_qkvz.weight",
                    (f"{lin}.in_proj_qkv.weight", f"{lin}.in_proj_z.weight"),
                    join=_rows_joined,
                    split=partial(_rows_split, qkv),
                    layers=linear,
                ),
                Joined(
                    "blocks.{layer}.attn.in_proj_ba.weight",
                    (f"{lin}.in_proj_b.weight", f"{lin}.in_proj_a.weight"),
                    join=_rows_joined,
                    split=partial(_rows_split, heads),
                    layers=linear,
                ),
            ]
        out[name] = kept
    return out


HF_FIELDS = HFFields(
    mapped=qwen3_next.HF_FIELDS.mapped,
    fixed={
        **qwen3_next.HF_FIELDS.fixed,
        "decoder_sparse_step": (1, None),
        "norm_topk_prob": (True, None),
        "attention_dropout": (any_value,),
    },
)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only); a
    vision-language config is read for its ``text_config``."""
    hf, _ = text_checkpoint(hf)
    check_hf_config(hf, "Qwen3.5-MoE (qwen3_5_moe)", HF_FIELDS, strict)
    rope = hf.get("rope_parameters") or {}
    options = {k: v for k, v in hf.items() if k not in ("decoder_sparse_step", "norm_topk_prob")}
    if "partial_rotary_factor" in rope:
        options["partial_rotary_factor"] = rope["partial_rotary_factor"]
    # no dense FFN: every block is MoE (the width is unused)
    options.setdefault("intermediate_size", hf["moe_intermediate_size"])
    return qwen3_next.config_from_hf(
        {**options, "norm_topk_prob": True, "decoder_sparse_step": 1}, strict=False
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    out = qwen3_next.config_to_hf(config)
    if config.moe.every != 1:
        raise ValueError("a Qwen3.5-MoE model has an MoE layer in every block (moe.every=1)")
    router = cast(TopKRouterConfig, common.moe_layer(config, "Qwen3.5-MoE").router)
    if not router.normalize_weights:
        raise ValueError("a Qwen3.5-MoE model renormalises its top-k weights")
    for key in ("decoder_sparse_step", "norm_topk_prob", "mlp_only_layers", "intermediate_size"):
        out.pop(key)
    return {**out, "architectures": ["Qwen3_5MoeForCausalLM"], "model_type": TEXT_MODEL_TYPE}
