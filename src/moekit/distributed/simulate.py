"""Plan at full scale by simulation: build the real sharding of a model on the meta device
under a fake process group of the whole world and count what a rank holds.

``torch.distributed``'s ``fake`` backend answers every collective without doing it, so one
process can play rank ``r`` of a world of 256: the model is built on the meta device (no
memory), ``moekit.distributed.mesh.parallelize`` applies the real FSDP2 and expert-parallel
layout, and the local shapes of the ``DTensor`` shards give the bytes that rank would hold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from moekit.distributed.expert_parallel import ExpertParallelDispatcher
from moekit.distributed.mesh import ParallelConfig, _local, parallelize
from moekit.layers import MoE
from moekit.models.transformer.model import TransformerLM


@dataclass
class SimulatedRank:
    """What one rank holds under the simulated mesh."""

    rank: int
    world: int
    ep: int
    dp_shard: int
    dp_replicate: int
    params: int
    expert_params: int
    dense_params: int
    weight_bytes: float

    def as_dict(self) -> dict:
        return asdict(self)


def simulate_rank(
    model_config: Any,
    parallel: ParallelConfig,
    *,
    world: int,
    rank: int = 0,
    dtype: str = "bf16",
) -> SimulatedRank:
    """Rank ``rank``'s parameters under ``parallel`` on ``world`` ranks, counted from the real
    sharding of ``model_config`` (a ``TransformerConfig``) built on the meta device."""

    if dist.is_initialized():
        raise RuntimeError("simulate_rank needs a process without a process group")
    width = {"bf16": 2, "fp32": 4}[dtype]
    dims = parallel.resolve(world, model_config.moe.num_experts)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        meshes = dims.build_meshes("cpu")
        with torch.device("meta"):
            model = TransformerLM(model_config)
        parallelize(model, meshes)
        expert_ids = {
            id(p)
            for m in model.modules()
            if isinstance(m, MoE) and isinstance(m.dispatcher, ExpertParallelDispatcher)
            for p in m.experts.parameters()
        }
        local = {id(p): _local(p).numel() for p in model.parameters()}
    finally:
        dist.destroy_process_group()
    experts = sum(n for i, n in local.items() if i in expert_ids)
    total = sum(local.values())
    return SimulatedRank(
        rank=rank,
        world=world,
        ep=dims.ep,
        dp_shard=dims.dp_shard,
        dp_replicate=dims.dp_replicate,
        params=total,
        expert_params=experts,
        dense_params=total - experts,
        weight_bytes=float(total * width),
    )
