"""A data × expert parallel mesh with FSDP2, as torchtitan lays it out (``parallel_dims.py``).

Over the same ``W = dp_replicate · dp_shard`` ranks there are two views:

- dense: ``(dp_replicate, dp_shard)``. Embeddings, attention, norms, routers, shared experts,
  dense FFNs and the head are sharded with ``fully_shard`` over ``dp_shard`` and replicated over
  ``dp_replicate`` (HSDP when both are > 1).
- sparse: ``(dp_replicate, efsdp, ep)`` with ``ep | dp_shard`` and ``efsdp = dp_shard / ep``.
  Routed experts are split by expert over ``ep`` (all-to-all of rows) and each rank's experts are
  sharded with ``fully_shard`` over ``efsdp`` (and replicated over ``dp_replicate``).

After each backward, ``finish_expert_gradients`` divides expert gradients by ``ep`` (the rows
came from all ``ep`` ranks' tokens; FSDP2 averages over the expert mesh only).

Ranks of one ``ep`` group are consecutive (rank = ``(r · efsdp + f) · ep + e``). Any world that
factors this way works, including more ranks than experts (E = 4 on 8 ranks: ``ep = 4``,
``efsdp = 2``). Every data-parallel rank sees its own slice of the global batch; expert counts
(Switch loss, statistics, the DeepSeek bias tally) and capacity are decided over all of them, so
a step equals one process with the global batch up to reduction order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

from moekit.distributed.expert_parallel import ExpertParallelDispatcher
from moekit.experts.bank import ExpertBank
from moekit.layers import MoE
from moekit.utils.validation import check_fields


@dataclass(kw_only=True)
class ParallelConfig:
    """How ranks split the work (the ``parallel`` section of a training config).

    Args:
        ep: expert-parallel degree: each MoE layer's experts are split over ``ep`` ranks.
        dp_shard: ranks that shard the weights with FSDP2 (-1: the world / ``dp_replicate``).
        dp_replicate: replicas of the sharded model (HSDP across them).
    """

    ep: int = 1
    dp_shard: int = -1
    dp_replicate: int = 1

    def __post_init__(self) -> None:
        check_fields(self, "parallel.")
        if self.ep < 1 or self.dp_replicate < 1 or (self.dp_shard < 1 and self.dp_shard != -1):
            raise ValueError(
                f"parallel.ep and parallel.dp_replicate must be >= 1 and parallel.dp_shard >= 1 "
                f"(or -1: the rest), got ep={self.ep}, dp_shard={self.dp_shard}, "
                f"dp_replicate={self.dp_replicate}"
            )

    def resolve(self, world: int, num_experts: int = 0) -> ParallelDims:
        """The sizes for ``world`` ranks; raises naming the sizes that do not factor."""
        launched = max(self.ep, self.dp_replicate, self.dp_shard)
        if world == 1 and launched > 1:  # the user never set the sizes the checks below name
            raise ValueError(
                f"parallel.ep={self.ep}, dp_shard={self.dp_shard}, dp_replicate="
                f"{self.dp_replicate} need several processes, but this is one: launch with "
                f"torchrun --nproc-per-node N (N a multiple of {launched}), e.g. `torchrun "
                f"--nproc-per-node {launched} -m moekit.cli.main train ...`"
            )
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if world % self.dp_replicate:
                raise ValueError(
                    f"parallel.dp_replicate={self.dp_replicate} does not divide the {world} ranks"
                )
            dp_shard = world // self.dp_replicate
        if self.dp_replicate * dp_shard != world:
            raise ValueError(
                f"parallel.dp_replicate={self.dp_replicate} × parallel.dp_shard={dp_shard} = "
                f"{self.dp_replicate * dp_shard}, not the {world} ranks launched"
            )
        if dp_shard % self.ep:
            raise ValueError(
                f"parallel.ep={self.ep} must divide parallel.dp_shard={dp_shard} (experts are "
                "split over ranks that also shard the dense weights)"
            )
        if num_experts and num_experts % self.ep:
            raise ValueError(
                f"parallel.ep={self.ep} must divide the {num_experts} experts of each MoE layer"
            )
        return ParallelDims(
            world=world, dp_replicate=self.dp_replicate, dp_shard=dp_shard, ep=self.ep
        )


@dataclass(frozen=True)
class ParallelDims:
    """Resolved mesh sizes (``ParallelConfig.resolve``)."""

    world: int
    dp_replicate: int
    dp_shard: int
    ep: int

    @property
    def efsdp(self) -> int:
        """Ranks that shard one set of experts (``dp_shard / ep``)."""
        return self.dp_shard // self.ep

    def build_meshes(self, device_type: str = "cpu") -> Meshes:
        """The dense ``(dp_replicate, dp_shard)`` and sparse ``(dp_replicate, efsdp, ep)`` device
        meshes over every rank (collective: every rank must call)."""

        dense = init_device_mesh(
            device_type,
            (self.dp_replicate, self.dp_shard),
            mesh_dim_names=("dp_replicate", "dp_shard"),
        )
        sparse = init_device_mesh(
            device_type,
            (self.dp_replicate, self.efsdp, self.ep),
            mesh_dim_names=("dp_replicate", "efsdp", "ep"),
        )
        return Meshes(dense=dense, sparse=sparse, dims=self)


@dataclass
class Meshes:
    """The two views of one set of ranks."""

    dense: Any  # DeviceMesh (dp_replicate, dp_shard)
    sparse: Any  # DeviceMesh (dp_replicate, efsdp, ep)
    dims: ParallelDims

    def dense_fsdp_mesh(self) -> Any:
        """The mesh FSDP2 shards dense weights over (1-D without replication)."""
        return self.dense if self.dims.dp_replicate > 1 else self.dense["dp_shard"]

    def expert_fsdp_mesh(self) -> Any:
        """The mesh FSDP2 shards each rank's experts over (``efsdp``, with ``dp_replicate`` when
        > 1). Of one rank it still takes the experts out of the dense blocks' sharding."""
        if self.dims.dp_replicate > 1:
            return self.sparse["dp_replicate", "efsdp"]
        return self.sparse["efsdp"]


def parallelize(
    model: nn.Module,
    meshes: Meshes,
    *,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
):
    """Apply the mesh to a single-device moekit model, in place; returns it.

    Every MoE layer gets an ``ExpertParallelDispatcher`` over the ``ep`` group (counting over
    every rank) and keeps its ``num_experts / ep`` experts, sharded with ``fully_shard`` over
    ``(dp_replicate, efsdp)`` (also when that is one rank: it keeps them out of the blocks'
    sharding); every block and then the whole model are sharded with
    ``fully_shard`` over ``(dp_replicate, dp_shard)``. Parameters become ``DTensor``s.

    ``param_dtype``: FSDP2's ``MixedPrecisionPolicy``: parameters gathered and computed in this
    dtype (``torch.bfloat16`` on devices with bf16), gradients reduced in float32; the
    sharded master weights and the optimizer stay float32.
    """

    mp = (
        MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        if param_dtype is not None
        else MixedPrecisionPolicy()
    )

    dims = meshes.dims
    ep_group = meshes.sparse["ep"].get_group()
    expert_mesh = meshes.expert_fsdp_mesh()
    for name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        if not isinstance(module.experts, ExpertBank):
            raise ValueError(f"{name or 'MoE'}: the mesh needs an ExpertBank")
        dispatcher = ExpertParallelDispatcher(
            module.dispatch,
            num_experts=module.num_experts,
            group=ep_group,
            count_group=dist.group.WORLD,
        )
        module.dispatcher = dispatcher
        module.experts = module.experts.select_experts(
            dispatcher.first_expert, dispatcher.local_experts
        )
        # the experts are this rank's own: shard them apart from the dense blocks; with fewer
        # local experts than efsdp ranks, shard each expert's rows (dim 1) instead of the
        # experts (dim 0), which would leave some ranks empty (as torchtitan does)
        placement = None
        if dispatcher.local_experts < dims.efsdp:

            def placement(param: nn.Parameter) -> Shard:
                return Shard(1)

        fully_shard(
            module.experts,
            mesh=expert_mesh,
            reshard_after_forward=reshard_after_forward,
            shard_placement_fn=placement,
            mp_policy=mp,
        )
    dense_mesh = meshes.dense_fsdp_mesh()
    # Blocks return views (the MoE output and routing tensors reshaped to (B, S, ·)); FSDP2
    # warns once per rank and module that an in-place op on such a view would skip its
    # all-gather. moekit only adds block outputs out of place (tests/distributed compares every
    # mesh with one process), so the warning says nothing a user could act on.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    if dims.world > 1:
        blocks = getattr(model, "blocks", [])
        for block in blocks:
            fully_shard(
                block, mesh=dense_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp
            )
        fully_shard(
            model, mesh=dense_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp
        )
    return model


@torch.no_grad()
def finish_expert_gradients(model: nn.Module, meshes: Meshes) -> None:
    """Call after backward, before clipping and the optimizer step: divide expert gradients by
    ``ep``. (FSDP2's reduce-scatter averages over the expert mesh only, but an expert's rows came
    from all ``ep`` ranks' tokens; gloo has no pre-scaled reduction for FSDP2 to do it.)"""
    ep = meshes.dims.ep
    if ep == 1:
        return
    for p in model.parameters():
        if id(p) in _is_expert(model) and p.grad is not None:
            _local(p.grad).div_(ep)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _is_expert(model: nn.Module) -> set[int]:
    return {
        id(p)
        for m in model.modules()
        if isinstance(m, MoE) and isinstance(m.dispatcher, ExpertParallelDispatcher)
        for p in m.experts.parameters()
    }


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, meshes: Meshes) -> torch.Tensor:
    """Clip every gradient by one global norm over the dense and the expert shards; returns the
    norm before clipping (what one process with the whole model would compute).

    A sharded gradient's squares are summed over the mesh dimensions it is sharded on; expert
    gradients are also summed over ``ep`` (each ``ep`` rank holds other experts); replicated
    dimensions are not summed (their copies are equal).
    """
    experts = _is_expert(model)
    sums: dict[tuple[int, ...], list[torch.Tensor]] = {}
    groups: dict[tuple[int, ...], list[Any]] = {}
    for p in model.parameters():
        if p.grad is None:
            continue
        grad = p.grad
        local_sq = _local(grad).float().pow(2).sum()
        reduce_over: list[Any] = []
        placements = getattr(grad, "placements", None)
        if placements is not None:
            mesh = getattr(grad, "device_mesh")  # noqa: B009 (a DTensor attribute)
            reduce_over += [mesh.get_group(i) for i, pl in enumerate(placements) if pl.is_shard()]
        if id(p) in experts and meshes.dims.ep > 1:
            reduce_over.append(meshes.sparse["ep"].get_group())
        key = tuple(id(g) for g in reduce_over)
        sums.setdefault(key, []).append(local_sq)
        groups[key] = reduce_over
    parts = []
    for key, values in sums.items():
        value = torch.stack(values).sum()
        for group in groups[key]:
            dist.all_reduce(value, group=group)
        parts.append(value)
    if not parts:  # no gradient anywhere
        return torch.zeros((), dtype=torch.float32, device=meshes.dense.device_type)
    norm = torch.stack([p.to(parts[0].device) for p in parts]).sum().sqrt()
    coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            _local(p.grad).mul_(coefficient.to(_local(p.grad).device, _local(p.grad).dtype))
    return norm


@torch.no_grad()
def full_tensors(model: nn.Module, meshes: Meshes) -> dict[str, torch.Tensor]:
    """The single-process state dict of a parallelised model (collective): sharded tensors
    gathered, each rank's experts gathered over ``ep``."""
    slices = _expert_slices(model)
    return {
        name: _gather_full(value, name in slices, meshes)
        for name, value in model.state_dict().items()
    }


def _expert_slices(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Name of every stacked expert tensor -> ``(first expert, experts here)``: this rank's
    share under expert parallelism, all of them otherwise."""
    slices = {}
    for name, m in model.named_modules():
        if not isinstance(m, MoE) or not isinstance(m.experts, ExpertBank):
            continue
        if isinstance(m.dispatcher, ExpertParallelDispatcher):
            share = (m.dispatcher.first_expert, m.dispatcher.local_experts)
        else:
            share = (0, m.num_experts)
        for n, _ in m.experts.named_parameters():
            slices[f"{name}.experts.{n}"] = share
    return slices


def _gather_full(value: torch.Tensor, expert: bool, meshes: Meshes) -> torch.Tensor:
    full = value.full_tensor() if hasattr(value, "full_tensor") else value
    if expert and meshes.dims.ep > 1:
        pieces = [torch.empty_like(full) for _ in range(meshes.dims.ep)]
        dist.all_gather(pieces, full.contiguous(), group=meshes.sparse["ep"].get_group())
        full = torch.cat(pieces)
    return full.detach().cpu()


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like`` (a DTensor: this rank's shard, no communication)."""
    if not hasattr(like, "device_mesh"):
        return full.to(like.device, like.dtype)

    mesh, placements = getattr(like, "device_mesh"), getattr(like, "placements")  # noqa: B009
    full = full.to(_local(like).device, like.dtype)
    return distribute_tensor(full, mesh, placements, src_data_rank=None)


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a single-process state dict into a parallelised model (each rank keeps its experts
    and its shards; no communication)."""
    slices = _expert_slices(model)
    for name, target in model.state_dict().items():
        value = state[name]
        if name in slices:
            first, count = slices[name]
            value = value.narrow(0, first, count)
        shard = _shard_like(value, target)
        _local(target).copy_(_local(shard))


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Load a single-process optimizer state dict into the optimizer of a parallelised model."""
    slices = _expert_slices(model)
    names = _parameter_names(model, optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for index, entries in state["state"].items():
        index = int(index)
        param, name = params[index], names[index]
        converted = {}
        for key, value in entries.items():
            if torch.is_tensor(value) and value.dim() > 0:
                if name in slices:
                    first, count = slices[name]
                    value = value.narrow(0, first, count)
                converted[key] = _shard_like(value, param)
            else:
                converted[key] = value
        sharded[index] = converted
    optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})
