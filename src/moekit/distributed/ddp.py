"""Apply expert and data parallelism to a single-device moekit model from outside.

    dist.init_process_group("gloo")            # or "nccl" on GPUs; torchrun sets the env
    model = parallelize_experts(TransformerLM(cfg))   # experts split over all ranks
    model = wrap_data_parallel(model)                 # DDP for everything but the experts

Semantics, chosen so that R ranks with B/R sequences each match one process with B sequences:
outputs per token are identical (dropless routing is per token); the Switch loss uses the
global expert load (summed over ranks); statistics and the DeepSeek bias tally are global, so
the bias stays identical on every rank; non-expert gradients are averaged by DDP and expert
gradients (which already gather every rank's tokens through the all-to-all) are divided by R.

Checkpoints are resharding-safe because they are always written in the single-process layout:
:func:`save_pretrained_distributed` gathers every rank's experts and rank 0 writes one
``model.safetensors``; :func:`from_pretrained_distributed` loads it on every rank and keeps the
local experts. The same folder loads with EP=1, 2, 4, ... and serves for inference as is.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moekit.distributed.expert_parallel import ExpertParallelDispatcher
from moekit.experts.bank import ExpertBank
from moekit.layers import MoE
from moekit.models.checkpoint import from_pretrained, save_pretrained


def parallelize_experts(model: nn.Module, group=None) -> nn.Module:
    """Split every ``MoE`` layer's experts over ``group`` (default: all ranks), in place: the
    layer's dispatcher becomes an :class:`ExpertParallelDispatcher` and its ``ExpertBank``
    keeps this rank's experts (same class, same parameter names, ``L`` rows)."""
    for name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        if not isinstance(module.experts, ExpertBank):
            raise ValueError(f"{name or 'MoE'}: expert parallelism needs an ExpertBank")
        dispatcher = ExpertParallelDispatcher(
            module.dispatch, num_experts=module.num_experts, group=group
        )
        module.dispatcher = dispatcher
        module.experts = module.experts.select_experts(
            dispatcher.first_expert, dispatcher.local_experts
        )
        for param in module.experts.parameters():
            param.register_hook(lambda grad, world=dispatcher.world: grad / world)
    return model


def _parallel_layers(model: nn.Module) -> Iterator[tuple[str, MoE, ExpertParallelDispatcher]]:
    """``(prefix of the expert bank's parameters, layer, dispatcher)`` of every EP layer."""
    for name, module in getattr(model, "module", model).named_modules():
        if isinstance(module, MoE) and isinstance(module.dispatcher, ExpertParallelDispatcher):
            yield (f"{name}.experts." if name else "experts."), module, module.dispatcher


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of parameters that live on one rank only (excluded from data parallelism)."""
    return [
        prefix + n
        for prefix, layer, _ in _parallel_layers(model)
        for n, _ in layer.experts.named_parameters()
    ]


def load_tally_names(model: nn.Module) -> list[str]:
    """Names of the bias-balancing load tallies (per-rank counts until they are reduced)."""
    return [name for name, _ in model.named_buffers() if name.endswith("load_since_update_E")]


def wrap_data_parallel(model: nn.Module, group=None) -> nn.parallel.DistributedDataParallel:
    """DDP over ``group`` for every parameter except the expert-parallel ones.

    The bias-balancing load tallies are kept out of DDP's buffer broadcast: each rank counts
    its own tokens and :func:`reduce_load_tallies` sums them before the bias update (DDP would
    otherwise overwrite every rank's tally with rank 0's at each forward).

    Buffers are not re-broadcast every forward (rope tables are constant and every rank applies
    the same bias update from the summed tally); gradients live in DDP's buckets (no copy).

    DDP sits in reference cycles: before ``destroy_process_group``, drop the wrapper and call
    ``gc.collect()`` (freed after the group, gloo's worker thread can abort the process).
    """
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, expert_parameter_names(model) + load_tally_names(model)
    )
    ddp = nn.parallel.DistributedDataParallel
    # torch >= 2.13 renames broadcast_buffers to forward_sync_buffers
    no_sync: dict[str, Any] = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
        else {"broadcast_buffers": False}
    )
    return ddp(model, process_group=group, gradient_as_bucket_view=True, **no_sync)


def reduce_load_tallies(model: nn.Module, group=None) -> int:
    """Plain data parallelism: sum every bias-balancing load tally over ``group`` (call before
    ``update_expert_bias``), so each rank applies the update one process with the whole batch
    would. Layers under expert parallelism already count globally and are skipped. Returns how
    many tallies were reduced."""
    model = getattr(model, "module", model)
    reduced = 0
    for module in model.modules():
        if isinstance(module, MoE) and not isinstance(module.dispatcher, ExpertParallelDispatcher):
            tally = getattr(module.router, "load_since_update_E", None)
            if tally is not None:
                dist.all_reduce(tally, group=group)
                reduced += 1
    return reduced


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-process state dict: expert slices gathered from every rank (collective)."""
    model = getattr(model, "module", model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for prefix, layer, dispatcher in _parallel_layers(model):
        for name, param in layer.experts.named_parameters():
            pieces = [torch.empty_like(param) for _ in range(dispatcher.world)]
            dist.all_gather(pieces, param.detach().contiguous(), group=dispatcher.group)
            state[prefix + name] = torch.cat(pieces).cpu()
    return state


def save_pretrained_distributed(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Gather and write a single-process checkpoint (rank 0 writes; every rank must call)."""

    model = getattr(model, "module", model)
    state = full_state_dict(model)
    if dist.get_rank() == 0:
        full = type(model)(model.config)
        full.load_state_dict(state)
        save_pretrained(full, directory)
    dist.barrier()
    return Path(directory)


def from_pretrained_distributed(directory: str | os.PathLike, group=None) -> nn.Module:
    """Load a single-process checkpoint on every rank and keep this rank's experts."""

    return parallelize_experts(from_pretrained(directory), group)


def _expert_param_slices(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[int, ExpertParallelDispatcher]:
    """Optimizer state index of every expert-parallel parameter -> its layer's dispatcher (the
    state dict numbers parameters in ``param_groups`` order)."""
    owners = {
        id(p): dispatcher
        for _, layer, dispatcher in _parallel_layers(model)
        for p in layer.experts.parameters()
    }
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: owners[id(p)] for i, p in enumerate(params) if id(p) in owners}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state in the single-process layout (expert slices gathered; collective)."""
    model = getattr(model, "module", model)
    state = optimizer.state_dict()
    for index, dispatcher in _expert_param_slices(model, optimizer).items():
        # state_dict() shares the per-parameter dicts with the live optimizer: copy first
        entries = state["state"][index] = dict(state["state"].get(index, {}))
        for key, value in list(entries.items()):
            if torch.is_tensor(value) and value.dim() > 0:
                pieces = [torch.empty_like(value) for _ in range(dispatcher.world)]
                dist.all_gather(pieces, value.contiguous(), group=dispatcher.group)
                entries[key] = torch.cat(pieces)
    return state


def shard_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """Keep this rank's rows of every expert-parallel parameter's optimizer state."""
    model = getattr(model, "module", model)
    for index, dispatcher in _expert_param_slices(model, optimizer).items():
        entries = state["state"].get(index, {})
        for key, value in list(entries.items()):
            if torch.is_tensor(value) and value.dim() > 0:
                entries[key] = value.narrow(
                    0, dispatcher.first_expert, dispatcher.local_experts
                ).clone()
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a single-process state dict into a (possibly expert-parallel) model."""
    model = getattr(model, "module", model)
    local = {}
    for prefix, layer, dispatcher in _parallel_layers(model):
        for name, _ in layer.experts.named_parameters():
            local[prefix + name] = state[prefix + name].narrow(
                0, dispatcher.first_expert, dispatcher.local_experts
            )
    model.load_state_dict({**state, **local})
