"""Process-group set-up for ``moekit train`` under ``torchrun``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moekit.utils.device import distributed_backend


@dataclass
class DistributedContext:
    """This process's place: rank 0 of 1 when not distributed."""

    rank: int = 0
    world: int = 1
    expert_parallel: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(
    expert_parallel: int, device: torch.device | None = None
) -> DistributedContext:
    """Join the process group ``torchrun`` describes (NCCL for a CUDA device, else gloo).

    Args:
        expert_parallel: 1 for no expert parallelism (plain data parallelism when several
            processes run), or the number of processes: experts are split over all of them.
        device: this process's device (``moekit.utils.device.resolve_device``); the CPU when
            ``None``.
    """
    device = device or torch.device("cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if expert_parallel < 1:
        raise ValueError(f"expert_parallel must be >= 1, got {expert_parallel}")
    if expert_parallel > 1 and expert_parallel != world:
        raise ValueError(
            f"expert_parallel={expert_parallel} must equal the number of processes ({world}); "
            f"launch with torchrun --nproc-per-node {expert_parallel}"
        )
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
    return DistributedContext(dist.get_rank(), dist.get_world_size(), expert_parallel > 1)
