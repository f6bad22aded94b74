"""Dense Llama-style models (Llama, Mistral, Qwen2) -> moekit dense ``TransformerLM``: the
sources for sparse upcycling. Import only; export an upcycled model as Mixtral or Qwen-MoE."""

from __future__ import annotations

from functools import partial
from typing import Any

from moekit.experts.activations import Activation
from moekit.interop import common
from moekit.interop.keymap import Entry
from moekit.models.transformer.config import TransformerConfig

MODEL_TYPES = ("llama", "mistral", "qwen2")


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    entries = [
        *common.backbone(qkv_bias=config.qkv_bias, tied=config.tie_embeddings),
        *common.dense_ffn("blocks.{layer}.ffn", "model.layers.{layer}.mlp", layers="dense"),
    ]
    return {"checkpoint": entries}


def config_from_hf(hf: dict[str, Any], model_type: str) -> TransformerConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported")
    if model_type == "mistral" and hf.get("sliding_window"):
        raise ValueError("Mistral sliding-window attention is not supported yet")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("Qwen2 sliding-window attention is not supported yet")
    if model_type == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ValueError("Llama attention_bias/mlp_bias are not supported yet")
    return TransformerConfig(
        **common.attention_fields({**hf, "model_type": model_type}),
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.SWIGLU,
        qkv_bias=model_type == "qwen2",
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    raise ValueError("dense Llama-style export is not provided; upcycle and export as 'mixtral'")


def family(model_type: str):
    """A family-module-like namespace for one of ``MODEL_TYPES``."""
    from types import SimpleNamespace

    return SimpleNamespace(
        MODEL_TYPE=model_type,
        keymaps=keymaps,
        config_from_hf=partial(config_from_hf, model_type=model_type),
        config_to_hf=config_to_hf,
    )
