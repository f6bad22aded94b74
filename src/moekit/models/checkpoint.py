"""``save_pretrained`` / ``from_pretrained``: ``config.json`` + ``model.safetensors``, no pickle.

A save writes both files into a fresh sibling folder and swaps it into place, so an interrupted
save leaves the previous checkpoint (or nothing) at the path, never a half-written mix. Loading
checks the model type, the config keys, the safetensors header and every tensor name and shape,
and names what is missing, unexpected or mismatched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from moekit.models.encoder_decoder.model import EncoderDecoderConfig, EncoderDecoderLM
from moekit.models.sharded_checkpoint import is_sharded, read_state_dict
from moekit.models.transformer.model import TransformerConfig, TransformerLM
from moekit.models.vision.vit import VisionMoE, VisionMoEConfig
from moekit.utils.serialization import (
    add_checksums,
    atomic_write_json,
    config_from_dict,
    config_to_dict,
    read_config_file,
    verify_checksums,
    write_folder_atomically,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def _registry() -> dict[str, tuple[type[nn.Module], type]]:

    return {
        TransformerLM.model_type: (TransformerLM, TransformerConfig),
        EncoderDecoderLM.model_type: (EncoderDecoderLM, EncoderDecoderConfig),
        VisionMoE.model_type: (VisionMoE, VisionMoEConfig),
    }


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save ``model`` (a moekit model with ``config`` and ``model_type``) to ``directory``."""
    return write_folder_atomically(directory, lambda staging: write_model_files(model, staging))


def write_model_files(model: nn.Module, folder: Path) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``folder`` (no atomicity here)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    add_checksums(folder, [WEIGHTS_FILE])
    write_model_config(model, folder)


def write_model_config(model: nn.Module, folder: Path) -> None:
    """Write ``config.json`` (model type, format version, config, LoRA) into ``folder``."""
    atomic_write_json(
        folder / CONFIG_FILE,
        {
            "model_type": model.model_type,
            "format_version": FORMAT_VERSION,
            "config": config_to_dict(model.config),
            # LoRA adapters (moekit.adapters) are re-attached by from_pretrained
            **(
                {"lora": config_to_dict(model.lora_config)}
                if getattr(model, "lora_config", None) is not None
                else {}
            ),
        },
    )


def read_config(directory: str | os.PathLike) -> tuple[str, Any]:
    """The ``(model_type, config)`` stored in a checkpoint folder."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
    data = read_config_file(path)
    registry = _registry()
    model_type = data.get("model_type")
    if model_type not in registry:
        raise ValueError(
            f"{path}: model_type {model_type!r} is not one of {', '.join(sorted(registry))}"
        )
    return model_type, config_from_dict(registry[model_type][1], data.get("config", {}))


def from_pretrained(directory: str | os.PathLike, *, verify: bool | None = None) -> nn.Module:
    """Load a model saved by :func:`save_pretrained`.

    ``verify``: check the weights against the SHA-256 recorded when they were written
    (``None``: unless ``$MOEKIT_VERIFY_CHECKSUMS=0``, which ``moekit --no-verify`` sets).
    """
    directory = Path(directory)
    model_type, config = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file() and is_sharded(directory):  # written by every rank (DCP)
        tensors = read_state_dict(directory)
    else:
        if not weights.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_FILE} in {directory}")
        verify_checksums(directory, [WEIGHTS_FILE], verify)
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{weights} is corrupt or not a safetensors file: {e}") from None
    model = _registry()[model_type][0](config)
    lora = json.loads((directory / CONFIG_FILE).read_text()).get("lora")
    if lora is not None:
        # the adapters build on the models (an upward import, decided in test_architecture)
        from moekit.adapters.lora import LoRAConfig, add_lora  # noqa: PLC0415 (upward)

        add_lora(model, config_from_dict(LoRAConfig, lora, "lora"))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = sorted(
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(tensors)
        if tensors[k].shape != expected[k].shape
    )
    # integer tensors (quantised experts' codes) must come as they were written: a float
    # there is a damaged or foreign file, which load_state_dict would silently round
    wrong_dtype = sorted(
        f"{k}: file {tensors[k].dtype} vs model {expected[k].dtype}"
        for k in set(expected) & set(tensors)
        if tensors[k].dtype != expected[k].dtype
        and not (tensors[k].is_floating_point() and expected[k].is_floating_point())
    )
    if missing or unexpected or wrong_shape or wrong_dtype:
        problems = []
        if missing:
            problems.append("missing: " + ", ".join(missing))
        if unexpected:
            problems.append("unexpected: " + ", ".join(unexpected))
        if wrong_shape:
            problems.append("shape mismatch: " + "; ".join(wrong_shape))
        if wrong_dtype:
            problems.append("dtype mismatch: " + "; ".join(wrong_dtype))
        raise ValueError(f"{weights} does not match its config.json ({' | '.join(problems)})")
    with torch.no_grad():
        model.load_state_dict(tensors, strict=True)
    return model
