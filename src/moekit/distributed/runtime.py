"""Process-group and mesh set-up for ``moekit train`` under ``torchrun``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moekit.distributed.mesh import Meshes, ParallelConfig, ParallelDims
from moekit.utils.device import distributed_backend


@dataclass
class DistributedContext:
    """This process's place: rank 0 of 1 when not distributed; ``meshes`` under ``torchrun``."""

    rank: int = 0
    world: int = 1
    meshes: Meshes | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dims(self) -> ParallelDims:
        """The mesh sizes (one rank of everything when not distributed)."""
        if self.meshes is None:
            return ParallelDims(world=1, dp_replicate=1, dp_shard=1, ep=1)
        return self.meshes.dims

    @property
    def expert_parallel(self) -> bool:
        """Experts are split over ranks."""
        return self.dims.ep > 1


def setup_distributed(
    parallel: ParallelConfig | None = None,
    device: torch.device | None = None,
    num_experts: int = 0,
) -> DistributedContext:
    """Join the process group ``torchrun`` describes (NCCL for a CUDA device, else gloo) and
    build the data × expert meshes of ``parallel``. The sizes are checked against
    ``$WORLD_SIZE`` (and ``num_experts``) before any collective.
    """
    parallel = parallel or ParallelConfig()
    device = device or torch.device("cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dims = parallel.resolve(world, num_experts)  # names the sizes that do not factor
    if world == 1:
        return DistributedContext()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # device_id binds the communicator to this GPU now (no lazy start, no guessing
            # the device in barrier)
            dist.init_process_group(distributed_backend(device), device_id=device)
        else:
            dist.init_process_group(distributed_backend(device))
    meshes: Any = dims.build_meshes(device.type)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), meshes)
