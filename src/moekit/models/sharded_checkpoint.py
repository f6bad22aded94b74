"""Sharded (DCP) checkpoints read in one process: the layout every rank writes its own part of
(``moekit.distributed.checkpoint``), read back as a single-process state dict, or consolidated
into ``model.safetensors`` one tensor at a time.

A sharded checkpoint folder holds ``config.json`` (as ``save_pretrained`` writes it) and
``sharded/``, a ``torch.distributed.checkpoint`` folder whose keys are:

- ``model.<name>``: every tensor but the routed experts, with its global shape;
- ``model.<name>.expert<e>``: expert ``e``'s slice of a stacked expert tensor (one key per
  expert, so any expert-parallel layout reads the experts it owns);
- ``optim.<name>.<state>`` and ``optim.<name>.<state>.expert<e>``: the optimizer state (training
  checkpoints).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

SHARDED_DIR = "sharded"
_EXPERT = re.compile(r"^(?P<base>.+)\.expert(?P<e>\d+)$")


def expert_key(name: str, expert: int) -> str:
    """The key of expert ``expert``'s slice of the stacked tensor ``name``."""
    return f"{name}.expert{expert:05d}"


def is_sharded(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a sharded checkpoint (``sharded/.metadata``)."""
    return (Path(folder) / SHARDED_DIR / ".metadata").is_file()


def _metadata(folder: Path) -> dict[str, Any]:

    try:
        return FileSystemReader(str(folder / SHARDED_DIR)).read_metadata().state_dict_metadata
    except Exception as error:  # DCP raises several types for a damaged folder
        raise ValueError(f"{folder / SHARDED_DIR} is not a readable checkpoint: {error}") from None


def tensor_layout(folder: str | os.PathLike, prefix: str = "model.") -> dict[str, tuple]:
    """``{name: (dtype, shape, experts)}`` of the single-process tensors under ``prefix``:
    ``experts`` is the number of per-expert keys stacked into ``name`` (0 for plain tensors)."""
    layout: dict[str, tuple] = {}
    for key, meta in _metadata(Path(folder)).items():
        if not key.startswith(prefix) or not hasattr(meta, "size"):
            continue
        name, experts = key[len(prefix) :], 0
        match = _EXPERT.match(name)
        if match:
            name = match["base"]
            previous = layout.get(name)
            experts = (previous[2] if previous else 0) + 1
        layout[name] = (meta.properties.dtype, tuple(meta.size), experts)
    return {
        name: (dtype, (experts, *shape) if experts else shape, experts)
        for name, (dtype, shape, experts) in layout.items()
    }


def _load_keys(folder: Path, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:

    dcp.load(template, checkpoint_id=str(folder / SHARDED_DIR), no_dist=True)
    return template


def read_tensor(folder: str | os.PathLike, name: str, prefix: str = "model.") -> torch.Tensor:
    """One single-process tensor of a sharded checkpoint (experts stacked)."""
    folder = Path(folder)
    dtype, shape, experts = tensor_layout(folder, prefix)[name]
    if not experts:
        key = prefix + name
        return _load_keys(folder, {key: torch.empty(shape, dtype=dtype)})[key]
    rows = [
        _load_keys(folder, {k: torch.empty(shape[1:], dtype=dtype)})[k]
        for k in (prefix + expert_key(name, e) for e in range(experts))
    ]
    return torch.stack(rows)


def read_state_dict(folder: str | os.PathLike, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Every single-process tensor under ``prefix`` (the whole model: use
    :func:`consolidate` to avoid holding it twice)."""
    return {name: read_tensor(folder, name, prefix) for name in tensor_layout(folder, prefix)}


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def consolidate(folder: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Write the model of a sharded checkpoint as one ``model.safetensors`` at ``out_file``,
    reading and writing one tensor (one expert of a stacked tensor) at a time."""
    folder, out_file = Path(folder), Path(out_file)
    layout = tensor_layout(folder)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(layout):
        dtype, shape, _ = layout[name]
        size = torch.empty((), dtype=dtype).element_size()
        for dim in shape:
            size *= dim
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in sorted(layout):
            dtype, shape, experts = layout[name]
            keys = (
                ["model." + name]
                if not experts
                else ["model." + expert_key(name, e) for e in range(experts)]
            )
            row_shape = shape if not experts else shape[1:]
            for key in keys:
                tensor = _load_keys(folder, {key: torch.empty(row_shape, dtype=dtype)})[key]
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_file)
    return out_file
