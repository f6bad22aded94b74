"""Dense Llama-style models (Llama, Mistral, Qwen2) <-> moekit dense ``TransformerLM``: the
sources for sparse upcycling, and the export of a dense moekit model (an upcycled one exports
as Mixtral or Qwen-MoE)."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
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
        *common.backbone(
            qkv_bias=common.softmax_attention(config, "Llama").qkv_bias, tied=config.tie_embeddings
        ),
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


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def config_to_hf(config: TransformerConfig, model_type: str) -> dict[str, Any]:
    """The HF config of a dense moekit model (whether it expresses every option is checked by
    the round trip in ``moekit.interop.expressible``)."""
    if any(config.moe.is_moe_layer(i) for i in range(config.n_layers)):
        raise ValueError(
            f"{model_type!r} is a dense family and this model has MoE layers; export it as an "
            "MoE family (mixtral, qwen2_moe, qwen3_moe, ...)"
        )
    hf = {
        **common.attention_to_hf(config),
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "intermediate_size": config.ffn_hidden,
    }
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif model_type == "mistral":
        hf["sliding_window"] = None
    else:
        hf.update(use_sliding_window=False, max_window_layers=config.n_layers)
    return hf


def family(model_type: str):
    """A family-module-like namespace for one of ``MODEL_TYPES``."""

    return SimpleNamespace(
        MODEL_TYPE=model_type,
        HF_FIELDS=HF_FIELDS[model_type],
        keymaps=keymaps,
        config_from_hf=partial(config_from_hf, model_type=model_type),
        config_to_hf=partial(config_to_hf, model_type=model_type),
    )
