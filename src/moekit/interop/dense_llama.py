"""Dense Llama-style models (Llama, Mistral, Qwen2) -> moekit dense ``TransformerLM``: the
sources for sparse upcycling. Import only; export an upcycled model as Mixtral or Qwen-MoE."""

from __future__ import annotations

from functools import partial
from typing import Any

from moekit.experts.activations import Activation
from moekit.interop import common
from moekit.interop.expressible import (
    HFFields,
    all_full_attention,
    any_value,
    check_hf_config,
    unset,
)
from moekit.interop.keymap import Entry
from moekit.models.transformer.model import TransformerConfig

MODEL_TYPES = ("llama", "mistral", "qwen2")


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    entries = [
        *common.backbone(qkv_bias=config.attention.qkv_bias, tied=config.tie_embeddings),
        *common.dense_ffn("blocks.{layer}.ffn", "model.layers.{layer}.mlp", layers="dense"),
    ]
    return {"checkpoint": entries}


HF_FIELDS = {
    "llama": HFFields(
        mapped=common.ATTENTION_HF_FIELDS,
        fixed={
            "hidden_act": ("silu",),
            "attention_bias": (False,),
            "mlp_bias": (False,),
            "pretraining_tp": (1,),
        },
    ),
    "mistral": HFFields(
        mapped=common.ATTENTION_HF_FIELDS,
        fixed={"hidden_act": ("silu",), "sliding_window": (unset,)},
    ),
    "qwen2": HFFields(
        mapped=common.ATTENTION_HF_FIELDS,
        fixed={
            "hidden_act": ("silu",),
            "use_sliding_window": (False, None),
            "sliding_window": (any_value,),  # unused without use_sliding_window
            "max_window_layers": (any_value,),
            "layer_types": (all_full_attention,),
        },
    ),
}


def config_from_hf(hf: dict[str, Any], model_type: str, strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, model_type, HF_FIELDS[model_type], strict)
    return TransformerConfig(
        **common.attention_fields({**hf, "model_type": model_type}, qkv_bias=model_type == "qwen2"),
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.SWIGLU,
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    raise ValueError("dense Llama-style export is not provided; upcycle and export as 'mixtral'")


def family(model_type: str):
    """A family-module-like namespace for one of ``MODEL_TYPES``."""
    from types import SimpleNamespace

    return SimpleNamespace(
        MODEL_TYPE=model_type,
        HF_FIELDS=HF_FIELDS[model_type],
        keymaps=keymaps,
        config_from_hf=partial(config_from_hf, model_type=model_type),
        config_to_hf=config_to_hf,
    )
