"""Training checkpoints: model, optimizer, scheduler, RNG and data position, no pickle.

A checkpoint is a folder ``<out_dir>/checkpoints/step_<N>/`` holding the model files of
``save_pretrained`` (``config.json``, ``model.safetensors``), ``optimizer.safetensors`` (every
optimizer tensor and the torch RNG state) and ``trainer_state.json`` (step, scheduler, optimizer
hyper-parameters, the training config). Each folder is written through a staging folder and
swapped in, then ``checkpoints/latest`` (a one-line file) is replaced atomically: a kill at any
moment leaves the previous checkpoint complete and pointed to.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from moekit.distributed.checkpoint import save_sharded
from moekit.models.checkpoint import from_pretrained, write_model_config, write_model_files
from moekit.utils.serialization import (
    add_checksums,
    atomic_write_bytes,
    atomic_write_json,
    verify_checksums,
    write_folder_atomically,
)

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
LATEST = "latest"


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    for pid, entries in state["state"].items():
        plain["state"][str(pid)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                plain["state"][str(pid)][key] = value
    return tensors, plain


def _join_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in plain["state"].items()}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    joined = {"state": state, "param_groups": plain["param_groups"]}
    if "param_names" in plain:
        joined["param_names"] = plain["param_names"]
    return joined


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Each optimizer group's parameters by name, in the optimizer's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def align_optimizer_state(state: dict, current: list[list[str]]) -> dict:
    """``state`` (an optimizer state dict saved with ``param_names``) keyed in the order of an
    optimizer whose groups hold the parameters ``current`` names: each parameter's moments go
    to the parameter of the same name, whatever order the model registers its parameters in
    now. A state saved without names (older checkpoints) is returned as it is (positional, as
    before); names that differ are refused, naming them."""
    saved = state.get("param_names")
    if saved is None:
        return state
    if [sorted(g) for g in saved] != [sorted(g) for g in current]:
        missing = sorted(set().union(*map(set, saved)) - set().union(*map(set, current)))
        extra = sorted(set().union(*map(set, current)) - set().union(*map(set, saved)))
        raise ValueError(
            "the checkpoint's optimizer holds other parameters than this model's (missing here: "
            f"{missing[:3] or 'none'}; new here: {extra[:3] or 'none'}; or a parameter moved "
            "between weight-decay groups)"
        )
    index = {name: i for i, name in enumerate(name for group in current for name in group)}
    saved_names = [name for group in saved for name in group]
    entries = {index[saved_names[int(k)]]: v for k, v in state["state"].items()}
    groups = [
        {**group, "params": [index[name] for name in names]}
        for group, names in zip(state["param_groups"], current, strict=True)
    ]
    return {"state": entries, "param_groups": groups, "param_names": current}


def save_training_checkpoint(
    checkpoints_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer_state: dict,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_config: dict[str, Any],
    rng_states: dict[str, torch.Tensor] | None = None,
    param_names: list[list[str]] | None = None,
) -> Path:
    """Write ``step_<step>`` under ``checkpoints_dir`` and point ``latest`` at it.

    ``model`` and ``optimizer_state`` are in the single-process layout (under expert
    parallelism the caller gathers them first), so checkpoints reshard freely.
    ``rng_states``: every rank's generator states (:func:`rng_states`); default: this
    process's. ``param_names``: each optimizer group's parameter names
    (:func:`parameter_names`), saved so that a resume maps moments by name
    (:func:`align_optimizer_state`).
    """
    checkpoints_dir = Path(checkpoints_dir)
    tensors, plain = _split_optimizer_state(optimizer_state)
    if param_names is not None:
        plain["param_names"] = param_names
    tensors.update(rng_states if rng_states is not None else rng_states_of_rank(0, None))

    def write(folder: Path) -> None:
        write_model_files(model, folder)
        save_file(tensors, str(folder / OPTIMIZER_FILE))
        add_checksums(folder, [OPTIMIZER_FILE])
        atomic_write_json(
            folder / STATE_FILE,
            {
                "step": step,
                "optimizer": plain,
                "scheduler": scheduler.state_dict(),
                "train_config": train_config,
            },
        )

    folder = write_folder_atomically(checkpoints_dir / f"step_{step:07d}", write)
    atomic_write_bytes(checkpoints_dir / LATEST, (folder.name + "\n").encode())
    return folder


def save_sharded_training_checkpoint(
    checkpoints_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_config: dict[str, Any],
    rng_states: dict[str, torch.Tensor],
) -> Path:
    """Every rank writes its shards of the model and optimizer (DCP, ``sharded/``), rank 0 the
    config, trainer state and generator states; ``latest`` is switched last (collective)."""

    checkpoints_dir = Path(checkpoints_dir)
    _, plain = _split_optimizer_state(
        {"state": {}, "param_groups": optimizer.state_dict()["param_groups"]}
    )

    def write_rest(folder: Path) -> None:
        write_model_config(model, folder)
        save_file({k: v.contiguous() for k, v in rng_states.items()}, str(folder / OPTIMIZER_FILE))
        atomic_write_json(
            folder / STATE_FILE,
            {
                "step": step,
                "optimizer": plain,
                "scheduler": scheduler.state_dict(),
                "train_config": train_config,
                "sharded": True,
            },
        )

    folder = save_sharded(checkpoints_dir / f"step_{step:07d}", model, optimizer, write_rest)
    if dist.get_rank() == 0:
        atomic_write_bytes(checkpoints_dir / LATEST, (folder.name + "\n").encode())
    dist.barrier()
    return folder


def restore_param_groups(optimizer: torch.optim.Optimizer, saved_groups: list[dict]) -> None:
    """Set each parameter group's hyperparameters (``lr``, ``betas``, ``weight_decay``, ...) to
    the saved ones, as ``Optimizer.load_state_dict`` does for a single-process checkpoint.

    A sharded checkpoint restores the optimizer's tensors through DCP; without this the first
    step after a resume runs at the constructor's ``lr`` instead of the schedule's (the
    scheduler writes the group's ``lr`` only at its next ``step()``). Groups that do not match
    in number or size are refused by name."""
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, this run's "
            f"{len(groups)}: it trains a different set of parameters (method, preset or "
            "LoRA settings changed?)"
        )
    for i, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"optimizer parameter group {i} holds {len(saved['params'])} parameters in the "
                f"checkpoint and {len(group['params'])} in this run"
            )
        for key, value in saved.items():
            if key != "params":
                group[key] = tuple(value) if isinstance(group.get(key), tuple) else value


def read_trainer_state(folder: str | Path, *, rank: int = 0, device=None) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint, with rank ``rank``'s generators restored."""
    folder = Path(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    restore_rng_states(load_file(str(folder / OPTIMIZER_FILE)), rank, device)
    return state


def remove_stale_staging(checkpoints_dir: str | Path) -> list[Path]:
    """Delete what killed checkpoint writes leave behind: staging folders
    (``.step_*.saving.*``, ``.step_*.old``) and temporary files (``.*.tmp``); returns them."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    stale = [
        p
        for p in root.glob(".*")
        if (
            p.is_dir()
            and p.name.startswith(".step_")
            and (".saving." in p.name or p.name.endswith(".old"))
        )
        or (p.is_file() and p.name.endswith(".tmp"))
    ]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def refuse_to_overwrite(checkpoints_dir: str | Path) -> None:
    """Raise if a fresh (not resumed) run would write over ``checkpoints_dir``'s checkpoints."""
    checkpoints = Path(checkpoints_dir)
    if checkpoints.exists() and any(checkpoints.iterdir()):
        raise FileExistsError(
            f"{checkpoints} already holds checkpoints; pass resume=True (--resume) or choose "
            "another out_dir"
        )


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The folder ``latest`` points to, or ``None`` when there is no checkpoint yet."""
    remove_stale_staging(checkpoints_dir)
    pointer = Path(checkpoints_dir) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    if not re.fullmatch(r"step_\d+", name):
        raise ValueError(
            f"{pointer} is empty or damaged ({name!r}); it should name a step_<N> folder "
            "beside it: write that name into it, or delete it to start over"
        )
    folder = Path(checkpoints_dir) / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{pointer} points to {folder.name}, which does not exist")
    return folder


def load_training_checkpoint(
    folder: str | Path,
    model_config: Any,
    *,
    rank: int = 0,
    device: torch.device | None = None,
) -> tuple[dict, dict, dict]:
    """Read ``folder``: ``(model state, optimizer state, trainer state)`` in the single-process
    layout; also restores rank ``rank``'s CPU generator and, on a CUDA ``device``, its CUDA
    generator (so dropout, jitter and noisy gating continue exactly)."""
    folder = Path(folder)
    loaded = from_pretrained(folder)  # validates config, names and shapes
    if loaded.config != model_config:
        raise ValueError(f"{folder} holds a different model config than this run's")
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"no {STATE_FILE} in {folder}")
    try:
        state = json.loads(state_path.read_text())
        for key in ("step", "optimizer", "scheduler"):
            state[key]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"{state_path} is truncated or damaged ({error!r}); resume from an earlier "
            f"checkpoint by writing its folder name into {folder.parent / LATEST}"
        ) from None
    verify_checksums(folder, [OPTIMIZER_FILE], None)
    try:
        tensors = load_file(str(folder / OPTIMIZER_FILE))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise ValueError(f"{folder / OPTIMIZER_FILE} is missing or corrupt: {e}") from None
    restore_rng_states(tensors, rank, device)
    return loaded.state_dict(), _join_optimizer_state(tensors, state["optimizer"]), state


def resolve_checkpoint(path: str) -> Path:
    """A model folder: ``path`` itself, the latest checkpoint of a run folder, or the checkpoint
    a ``checkpoints/latest`` pointer file names."""
    folder = Path(path)
    if folder.is_file() and folder.name == LATEST:  # the pointer file: the checkpoint it names
        named = latest_checkpoint(folder.parent)
        if named is None:
            raise FileNotFoundError(f"{path} names no checkpoint that exists")
        return named
    if (folder / "config.json").is_file():
        return folder
    latest = latest_checkpoint(folder / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint nor a run folder with one")
    return latest


def rng_states_of_rank(rank: int, device: torch.device | None) -> dict[str, torch.Tensor]:
    """This process's generator states under rank ``rank``'s keys: the CPU generator and, on a
    CUDA ``device``, that device's generator (jitter, noisy gating and dropout draw there)."""
    states = {f"rng.torch.rank{rank}": torch.get_rng_state()}
    if rank == 0:
        states["rng.torch"] = states["rng.torch.rank0"].clone()  # safetensors: no shared memory
    if device is not None and device.type == "cuda":
        states[f"rng.cuda.rank{rank}"] = torch.cuda.get_rng_state(device)
    return states


def rng_states(rank: int, world: int, device: torch.device | None) -> dict[str, torch.Tensor]:
    """Every rank's generator states, gathered on every rank when ``world > 1`` (a collective:
    all ranks call it)."""
    mine = rng_states_of_rank(rank, device)
    if world == 1:
        return mine

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {k: v.cpu() for k, v in mine.items()})
    return {k: v for states in gathered for k, v in states.items()}


def restore_rng_states(
    tensors: dict[str, torch.Tensor], rank: int, device: torch.device | None
) -> None:
    """Set this process's generators from a checkpoint's states for ``rank`` (a rank the
    checkpoint did not have, after a change of world size, takes rank 0's CPU state)."""
    torch.set_rng_state(tensors.get(f"rng.torch.rank{rank}", tensors["rng.torch"]))
    cuda_state = tensors.get(f"rng.cuda.rank{rank}")
    if cuda_state is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)
