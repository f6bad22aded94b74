"""Plan a run on a data × expert mesh before renting the cluster: per-rank memory and traffic.

Assumptions (stated in the output): experts are split evenly over the EP ranks and each rank's
experts sharded over dp_shard / EP ranks (FSDP2); every other parameter is sharded over
dp_shard ranks (dp_shard = 1: replicated, as plain data parallelism); FSDP gathers one block at
a time, which is not counted; AdamW keeps two float32 moments per parameter, plus a float32
master copy when the weights are stored in 16 bits; gradients are stored in the weight dtype;
routing is uniform, so a share (EP - 1) / EP of each token's k expert inputs leaves its rank.
Each MoE layer exchanges rows four times per step (dispatch and combine, forward and
backward)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moekit.analysis.params import BYTES_PER_PARAM, ArchSpec, report


@dataclass
class RankPlan:
    """Per-rank estimates for one mesh (``dp_shard`` ranks shard the weights, ``ep`` of them
    split the experts)."""

    expert_parallel: int
    dp_shard: int
    tokens_per_rank: int
    dtype: str
    params_per_rank: int
    weight_bytes: float
    gradient_bytes: float
    optimizer_bytes: float
    total_bytes: float
    all_to_all_bytes_per_step: float

    def as_dict(self) -> dict:
        return asdict(self)


def plan_expert_parallel(
    spec: ArchSpec,
    expert_parallel: int,
    tokens_per_rank: int,
    dtype: str = "bf16",
    *,
    dp_shard: int = 1,
) -> RankPlan:
    """Per-rank weight, gradient and optimizer memory and all-to-all bytes per step.

    Args:
        spec: the architecture (``spec_from_hf_config`` or ``spec_from_moekit``).
        expert_parallel: EP degree (ranks sharing the experts); must divide the expert count.
        tokens_per_rank: tokens each rank processes per optimizer step (batch x sequence).
        dtype: weight and activation dtype, one of fp32, bf16.
        dp_shard: ranks FSDP shards the weights over (a multiple of ``expert_parallel``; 1:
            the dense part replicated and only the experts split, as with DDP).
    """
    if dp_shard != 1 and (dp_shard < 1 or dp_shard % expert_parallel):
        raise ValueError(
            f"dp_shard={dp_shard} must be 1 or a multiple of expert_parallel={expert_parallel}"
        )
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    if expert_parallel < 1 or (spec.num_experts and spec.num_experts % expert_parallel):
        raise ValueError(
            f"expert_parallel={expert_parallel} must be >= 1 and divide "
            f"num_experts={spec.num_experts}"
        )
    counts = report(spec)
    routed = counts.breakdown["routed_experts"]
    if dp_shard == 1:
        per_rank = counts.total - routed + routed // expert_parallel
    else:  # dense over dp_shard; experts over ep, then over dp_shard / ep
        per_rank = -(-(counts.total - routed) // dp_shard) + -(-routed // dp_shard)
    width = BYTES_PER_PARAM[dtype]
    optimizer_per_param = 8.0 + (4.0 if dtype != "fp32" else 0.0)  # moments (+ master copy)
    leaving = (expert_parallel - 1) / expert_parallel
    traffic = spec.moe_layers * 4 * tokens_per_rank * spec.top_k * spec.d_model * width * leaving
    weights = per_rank * width
    grads = per_rank * width
    optimizer = per_rank * optimizer_per_param
    return RankPlan(
        expert_parallel=expert_parallel,
        dp_shard=dp_shard,
        tokens_per_rank=tokens_per_rank,
        dtype=dtype,
        params_per_rank=per_rank,
        weight_bytes=weights,
        gradient_bytes=grads,
        optimizer_bytes=optimizer,
        total_bytes=weights + grads + optimizer,
        all_to_all_bytes_per_step=traffic,
    )
