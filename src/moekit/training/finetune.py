"""Fine-tuning: start from trained weights, add LoRA, train only the chosen parameter groups.

``TrainConfig.finetune`` drives it (``moekit finetune`` fills it in); the training loop calls
:func:`load_streams` for the data and :func:`prepare_model` before building the optimizer, so a
fine-tuning run has the same checkpoints, resume and metrics as any other run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.adapters.lora import add_lora, lora_parameters, merge_lora
from moekit.analysis.inspect import count_routing
from moekit.experts.quantized import QuantizedExpertBank
from moekit.interop.expressible import function_fields
from moekit.interop.hf import from_hf
from moekit.models.checkpoint import from_pretrained
from moekit.models.encoder_decoder.model import EncoderDecoderConfig, EncoderDecoderLM
from moekit.models.transformer.model import TransformerLM
from moekit.training.checkpoint import resolve_checkpoint
from moekit.training.config import TrainConfig
from moekit.training.data import load_corpus, load_tokenizer
from moekit.training.instruct import load_instructions
from moekit.training.presets import (
    Selection,
    apply_selection,
    select_parameters,
    trainable_summary,
)
from moekit.training.seq2seq import load_seq2seq


def load_streams(config: TrainConfig) -> tuple[Any, Any]:
    """Train and validation streams: plain text, or instruction examples (packed rows for a
    decoder-only model; source/target pairs for an encoder–decoder)."""
    data = config.data
    if not data.instruction:
        return load_corpus(data)

    tokenizer = load_tokenizer(data.tokenizer)
    if isinstance(config.model, EncoderDecoderConfig):
        return load_seq2seq(data.path, tokenizer, data.seq_len, data.val_fraction)
    return load_instructions(data.path, tokenizer, data.seq_len, data.val_fraction, config.seed)


def is_hf_folder(path: Path) -> bool:
    """A folder whose ``config.json`` is a Hugging Face one (moekit's has a format version)."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and "model_type" in data and "format_version" not in data


def load_source(path: str) -> TransformerLM | EncoderDecoderLM:
    """The model to start from: a run folder's latest checkpoint, a moekit checkpoint folder,
    or a Hugging Face folder. Adapters of a fine-tuned source are merged in."""

    folder = Path(path)
    if is_hf_folder(folder):
        return from_hf(folder)

    model = from_pretrained(resolve_checkpoint(path))
    if not isinstance(model, TransformerLM | EncoderDecoderLM):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a language model")
    quantized = any(
        isinstance(m, QuantizedExpertBank) and m.adapter is not None for m in model.modules()
    )
    if lora_parameters(model) and not quantized:  # QLoRA adapters stay: no merged form exists
        merge_lora(model)
    return model


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights without adapter tensors (merged adapters are already in them)."""

    adapters = set(lora_parameters(model))
    return {k: v for k, v in model.state_dict().items() if k not in adapters}


def _config_differences(a: Any, b: Any) -> list[str]:
    """The options that change what the weights compute (not dropout, statistics, losses)."""

    fa, fb = function_fields(a), function_fields(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def prepare_model(
    model: nn.Module, config: TrainConfig, train_stream: Any, *, resuming: bool = False
) -> list[tuple[str, int, int]]:
    """Load ``finetune.init_from`` (not when ``resuming``: the checkpoint's weights replace
    them), add LoRA, freeze what the preset does not train; returns the trainable/total counts
    per parameter group."""
    finetune = config.finetune
    if finetune.init_from is not None and not resuming:
        source = load_source(finetune.init_from)
        differences = _config_differences(source.config, config.model)
        if differences:
            raise ValueError(
                f"finetune.init_from {finetune.init_from} has another architecture than "
                f"model: {', '.join(differences)} differ (moekit finetune copies the source's)"
            )
        model.load_state_dict(base_state_dict(source), strict=True)
    if finetune.lora is not None:
        add_lora(model, finetune.lora)
    if finetune.preset or finetune.lora is not None:
        selection = Selection()
        if finetune.preset:
            counts = None
            if "experts:top=" in finetune.preset:
                counts = count_routing(
                    model, _token_batches(train_stream, config, finetune.routing_batches)
                )
            selection = select_parameters(model, finetune.preset, routing_counts=counts)
        if finetune.lora is not None:
            selection.whole.update(lora_parameters(model))
        apply_selection(model, selection)
    return trainable_summary(model)


def _token_batches(stream: Any, config: TrainConfig, count: int) -> Iterator[tuple]:
    """Training batches ``(x, y[, segment_ids])`` (packed instruction rows keep their
    segments, so routing is counted as training will route)."""
    for index in range(count):
        yield stream.batch(index, config.data.batch_size, config.data.seq_len, config.seed)
