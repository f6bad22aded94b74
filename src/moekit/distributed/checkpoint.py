"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes its
own shards, nothing is gathered to one rank, and a checkpoint loads on any mesh.

Keys (``moekit.models.sharded_checkpoint``): dense tensors are saved as the FSDP2 ``DTensor``s
they are (global shapes, each rank writing its shard, replicas deduplicated); each routed
expert is its own key, written by the ranks that hold it, so a checkpoint written with ``ep=2``
loads with ``ep=4`` or in one process. The folder is published as the single-process
checkpoints are: written under a staging name, renamed into place, ``latest`` switched last;
stale staging folders are removed on restart.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from moekit.distributed.mesh import (
    Meshes,
    _expert_slices,
    _local,
    _parameter_names,
    _shard_like,
)
from moekit.models.sharded_checkpoint import SHARDED_DIR, expert_key


def _experts_full(value: torch.Tensor) -> torch.Tensor:
    """This rank's experts of a stacked tensor, whole (gathered over ``efsdp``)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _model_entries(model: nn.Module, *, full_local_experts: bool) -> dict[str, Any]:
    """``{key: tensor}``: dense DTensors as they are, experts one key per expert."""
    slices = _expert_slices(model)
    entries: dict[str, Any] = {}
    for name, value in model.state_dict().items():
        if name not in slices:
            entries[f"model.{name}"] = value
            continue
        first, count = slices[name]
        local = _experts_full(value) if full_local_experts else value
        for i in range(count):
            entries[f"model.{expert_key(name, first + i)}"] = local[i]
    return entries


def _optimizer_entries(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    slices = _expert_slices(model)
    names = _parameter_names(model, optimizer)
    entries: dict[str, Any] = {}
    for index, state in optimizer.state_dict()["state"].items():
        name = names[index]
        for key, value in state.items():
            if not torch.is_tensor(value):
                continue
            if name in slices and value.dim() > 0:
                first, count = slices[name]
                full = _experts_full(value)
                for i in range(count):
                    entries[f"optim.{expert_key(f'{name}.{key}', first + i)}"] = full[i]
            else:
                entries[f"optim.{name}.{key}"] = _local(value) if value.dim() == 0 else value
    return entries


def save_sharded(
    folder: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    write_rest: Any = None,
) -> Path:
    """Every rank writes its shards of ``model`` (and ``optimizer``) into ``folder/sharded``
    (collective); rank 0 then calls ``write_rest(staging)`` for the small files (config, trainer
    state) and renames the staging folder into place. Returns ``folder``."""
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.saving.dcp")
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()

    state = _model_entries(model, full_local_experts=True)
    if optimizer is not None:
        state.update(_optimizer_entries(model, optimizer))
    _fault_injection_point(folder.name)
    dcp.save(state, checkpoint_id=str(staging / SHARDED_DIR))
    if dist.get_rank() == 0:
        if write_rest is not None:
            write_rest(staging)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, folder)
    dist.barrier()
    return folder


def _fault_injection_point(folder_name: str) -> None:
    """For the preemption tests: ``MOEKIT_KILL_DURING_SAVE=<folder name>`` SIGKILLs rank 1
    as the shards of that checkpoint start to be written (the other ranks are inside the
    collective write, the staging folder half full). Unset in normal runs."""
    if os.environ.get("MOEKIT_KILL_DURING_SAVE") == folder_name and dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)


@torch.no_grad()
def load_sharded(
    folder: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    meshes: Meshes | None = None,
) -> None:
    """Load a sharded checkpoint into a (possibly parallelised) model and its optimizer, on
    whatever mesh it now runs (collective when distributed). The optimizer's state is created
    first (one zero step) so DCP has tensors to fill."""

    folder = Path(folder)
    slices = _expert_slices(model)
    template: dict[str, Any] = {}
    expert_rows: dict[str, list[torch.Tensor]] = {}
    for name, value in model.state_dict().items():
        if name not in slices:
            template[f"model.{name}"] = value
            continue
        first, count = slices[name]
        whole = _experts_full(value)
        rows = [torch.empty_like(whole[i]) for i in range(count)]
        expert_rows[name] = rows
        for i in range(count):
            template[f"model.{expert_key(name, first + i)}"] = rows[i]
    optimizer_rows: dict[tuple[int, str], list[torch.Tensor]] = {}
    if optimizer is not None:
        _materialise_state(optimizer)
        names = _parameter_names(model, optimizer)
        for index, state in optimizer.state_dict()["state"].items():
            name = names[index]
            for key, value in state.items():
                if not torch.is_tensor(value):
                    continue
                if name in slices and value.dim() > 0:
                    first = slices[name][0]
                    whole = _experts_full(value)
                    rows = [torch.empty_like(whole[i]) for i in range(whole.shape[0])]
                    optimizer_rows[(index, key)] = rows
                    for i, row in enumerate(rows):
                        template[f"optim.{expert_key(f'{name}.{key}', first + i)}"] = row
                else:
                    template[f"optim.{name}.{key}"] = _local(value) if value.dim() == 0 else value
    dcp.load(template, checkpoint_id=str(folder / SHARDED_DIR), no_dist=not dist.is_initialized())
    targets = model.state_dict()
    for name, rows in expert_rows.items():
        target = targets[name]
        _local(target).copy_(_local(_shard_like(torch.stack(rows), target)))
    if optimizer is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for (index, key), rows in optimizer_rows.items():
            state = optimizer.state[params[index]]
            _local(state[key]).copy_(_local(_shard_like(torch.stack(rows), state[key])))


def _materialise_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW-style state for every parameter (zeros) without changing any parameter."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if optimizer.state.get(p):
                continue
            state = optimizer.state[p]
            state["step"] = torch.zeros((), dtype=torch.float32, device="cpu")  # as AdamW keeps it
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
