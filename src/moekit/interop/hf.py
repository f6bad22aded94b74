"""Import Hugging Face MoE causal LMs into moekit and export them back.

    model = moekit.interop.from_hf("path/to/mixtral")       # or an in-memory transformers model
    moekit.interop.to_hf(model, "out/mixtral-export")        # loads in transformers as is

Families live in one module each (``moekit.interop.mixtral``); each provides its config
translation and declarative key maps for the per-expert checkpoint layout and the stacked
in-memory layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moekit.interop import (
    deepseek_v3,
    dense_llama,
    gpt_oss,
    mixtral,
    olmoe,
    qwen2_moe,
    qwen3_moe,
)
from moekit.interop import keymap as km
from moekit.interop.expressible import export_problems
from moekit.models.transformer.model import TransformerLM
from moekit.utils.serialization import atomic_write_json, write_folder_atomically

FAMILIES: dict[str, ModuleType] = {
    module.MODEL_TYPE: module
    for module in (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss)
}
FAMILIES.update({t: dense_llama.family(t) for t in dense_llama.MODEL_TYPES})  # dense sources


def _family(model_type: str | None) -> ModuleType:
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} has no moekit converter yet; supported: "
            f"{', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


def read_hf_folder(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and every tensor of a local HF checkpoint (sharded or not)."""
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder} (pickle weights are refused)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                state[key] = f.get_tensor(key)
    return json.loads(config_path.read_text()), state


def _layout(maps: dict[str, list[km.Entry]], state: dict[str, torch.Tensor]) -> list[km.Entry]:
    """The key map whose first expert tensor is present (per-expert or stacked layout)."""
    for entries in maps.values():
        experts = next((e for e in entries if isinstance(e, km.Experts)), None)
        if experts is None:
            return entries
        if any(h.format(layer=i, expert=0) in state for h in experts.hf for i in range(64)):
            return entries
    return next(iter(maps.values()))  # reports every missing key


def from_hf(source: nn.Module | str | os.PathLike) -> TransformerLM:
    """A moekit ``TransformerLM`` with the weights of an HF model (in memory or a folder)."""
    if isinstance(source, nn.Module):
        hf_config = cast(Any, source).config.to_dict()
        state = {k: v.detach() for k, v in source.state_dict().items()}
    else:
        hf_config, state = read_hf_folder(source)
    family = _family(hf_config.get("model_type"))
    config = family.config_from_hf(hf_config)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    moe_layers = [i for i in range(config.n_layers) if config.moe.is_moe_layer(i)]
    moekit_state = km.to_moekit(
        state,
        _layout(family.keymaps(config), state),
        n_layers=config.n_layers,
        moe_layers=moe_layers,
        num_experts=config.moe.num_experts,
    )
    model = TransformerLM(config)
    dtype = next(iter(moekit_state.values())).dtype
    for name, value in model.state_dict().items():  # run-time buffers HF does not store
        if name.endswith(km.RUNTIME_BUFFERS):
            moekit_state.setdefault(name, value)
    model.to(dtype).load_state_dict(moekit_state, strict=True)
    return model


def to_hf(model: TransformerLM, directory: str | os.PathLike, family: str) -> Path:
    """Write ``model`` as an HF checkpoint of ``family`` (per-expert layout, safetensors)."""
    fam = _family(family)
    config = model.config
    problems = export_problems(config, fam.config_to_hf, fam.config_from_hf)
    if problems:
        raise ValueError(
            f"cannot export as {family!r}: the family cannot express "
            + "; ".join(problems)
            + ". The exported model would compute something else, so nothing was written."
        )
    hf_config = fam.config_to_hf(config)
    moe_layers = [i for i in range(config.n_layers) if config.moe.is_moe_layer(i)]
    state = km.to_hf(
        {k: v.detach().cpu() for k, v in model.state_dict().items()},
        next(iter(fam.keymaps(config).values())),  # the first layout is the checkpoints' one
        n_layers=config.n_layers,
        moe_layers=moe_layers,
        num_experts=config.moe.num_experts,
    )

    def write(folder: Path) -> None:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(folder / "config.json", hf_config)

    return write_folder_atomically(directory, write)
