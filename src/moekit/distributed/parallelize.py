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

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from moekit.distributed.expert_parallel import ExpertParallelBank
from moekit.experts.bank import ExpertBank
from moekit.layers import MoE


def parallelize_experts(model: nn.Module, group=None) -> nn.Module:
    """Split every ``MoE`` layer's experts over ``group`` (default: all ranks), in place."""
    world = dist.get_world_size(group)
    for name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        if module.aux_loss.importance > 0 or module.aux_loss.load > 0:
            raise ValueError(
                f"{name or 'MoE'}: the importance and load losses are not supported with expert "
                "parallelism yet; use the Switch loss or bias balancing"
            )
        module.process_group = group if group is not None else dist.group.WORLD
        if isinstance(module.experts, ExpertBank):
            module.experts = ExpertParallelBank(module.experts, group)
            for param in module.experts.parameters():
                param.register_hook(lambda grad, world=world: grad / world)
    return model


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of parameters that live on one rank only (excluded from data parallelism)."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, ExpertParallelBank):
            prefix = f"{module_name}." if module_name else ""
            names += [prefix + n for n, _ in module.named_parameters()]
    return names


def load_tally_names(model: nn.Module) -> list[str]:
    """Names of the bias-balancing load tallies (per-rank counts until they are reduced)."""
    return [name for name, _ in model.named_buffers() if name.endswith("load_since_update_E")]


def wrap_data_parallel(model: nn.Module, group=None) -> nn.parallel.DistributedDataParallel:
    """DDP over ``group`` for every parameter except the expert-parallel ones.

    The bias-balancing load tallies are kept out of DDP's buffer broadcast: each rank counts
    its own tokens and :func:`reduce_load_tallies` sums them before the bias update (DDP would
    otherwise overwrite every rank's tally with rank 0's at each forward).
    """
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, expert_parameter_names(model) + load_tally_names(model)
    )
    return nn.parallel.DistributedDataParallel(model, process_group=group)


def reduce_load_tallies(model: nn.Module, group=None) -> int:
    """Plain data parallelism: sum every bias-balancing load tally over ``group`` (call before
    ``update_expert_bias``), so each rank applies the update one process with the whole batch
    would. Layers under expert parallelism already count globally and are skipped. Returns how
    many tallies were reduced."""
    model = getattr(model, "module", model)
    reduced = 0
    for module in model.modules():
        if isinstance(module, MoE) and module.process_group is None:
            tally = getattr(module.router, "load_since_update_E", None)
            if tally is not None:
                dist.all_reduce(tally, group=group)
                reduced += 1
    return reduced


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-process state dict: expert slices gathered from every rank (collective)."""
    model = getattr(model, "module", model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for module_name, module in model.named_modules():
        if not isinstance(module, ExpertParallelBank):
            continue
        prefix = f"{module_name}." if module_name else ""
        for name, param in module.named_parameters():
            pieces = [torch.empty_like(param) for _ in range(module.world)]
            dist.all_gather(pieces, param.detach().contiguous(), group=module.group)
            state[prefix + name] = torch.cat(pieces).cpu()
    return state


def save_pretrained_distributed(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Gather and write a single-process checkpoint (rank 0 writes; every rank must call)."""
    from moekit.models.checkpoint import save_pretrained

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
    from moekit.models.checkpoint import from_pretrained

    return parallelize_experts(from_pretrained(directory), group)


def _expert_param_slices(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[int, ExpertParallelBank]:
    """Optimizer state index of every expert-parallel parameter -> its bank (the state dict
    numbers parameters in ``param_groups`` order)."""
    banks = {
        id(p): m
        for m in model.modules()
        if isinstance(m, ExpertParallelBank)
        for p in m.parameters()
    }
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: banks[id(p)] for i, p in enumerate(params) if id(p) in banks}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state in the single-process layout (expert slices gathered; collective)."""
    model = getattr(model, "module", model)
    state = optimizer.state_dict()
    for index, bank in _expert_param_slices(model, optimizer).items():
        # state_dict() shares the per-parameter dicts with the live optimizer: copy first
        entries = state["state"][index] = dict(state["state"].get(index, {}))
        for key, value in list(entries.items()):
            if torch.is_tensor(value) and value.dim() > 0:
                pieces = [torch.empty_like(value) for _ in range(bank.world)]
                dist.all_gather(pieces, value.contiguous(), group=bank.group)
                entries[key] = torch.cat(pieces)
    return state


def shard_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """Keep this rank's rows of every expert-parallel parameter's optimizer state."""
    model = getattr(model, "module", model)
    for index, bank in _expert_param_slices(model, optimizer).items():
        entries = state["state"].get(index, {})
        rows = slice(bank.first_expert, bank.first_expert + bank.local_experts)
        for key, value in list(entries.items()):
            if torch.is_tensor(value) and value.dim() > 0:
                entries[key] = value[rows].clone()
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a single-process state dict into a (possibly expert-parallel) model."""
    model = getattr(model, "module", model)
    local = {}
    for module_name, module in model.named_modules():
        if isinstance(module, ExpertParallelBank):
            prefix = f"{module_name}." if module_name else ""
            rows = slice(module.first_expert, module.first_expert + module.local_experts)
            for name, _ in module.named_parameters():
                local[prefix + name] = state[prefix + name][rows]
    model.load_state_dict({**state, **local})
