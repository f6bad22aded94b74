"""Plan an expert-parallel run before renting the cluster: per-rank memory and traffic.

Assumptions (stated in the output): experts are split evenly over the EP ranks, every other
parameter is replicated (data parallel); AdamW keeps two float32 moments per parameter, plus a
float32 master copy when the weights are stored in 16 bits; gradients are stored in the weight
dtype; routing is uniform, so a share ``(EP - 1) / EP`` of each token's ``k`` expert inputs
leaves its rank. Each MoE layer exchanges rows four times per step (dispatch and combine,
forward and backward).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moekit.analysis.params import BYTES_PER_PARAM, ArchSpec, report


@dataclass
class RankPlan:
    """Per-rank estimates for one EP degree."""

    expert_parallel: int
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
    spec: ArchSpec, expert_parallel: int, tokens_per_rank: int, dtype: str = "bf16"
) -> RankPlan:
    """Per-rank weight, gradient and optimizer memory and all-to-all bytes per step.

    Args:
        spec: the architecture (``spec_from_hf_config`` or ``spec_from_moekit``).
        expert_parallel: EP degree (ranks sharing the experts); must divide the expert count.
        tokens_per_rank: tokens each rank processes per optimizer step (batch x sequence).
        dtype: weight and activation dtype, one of fp32, bf16.
    """
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    if expert_parallel < 1 or (spec.num_experts and spec.num_experts % expert_parallel):
        raise ValueError(
            f"expert_parallel={expert_parallel} must be >= 1 and divide "
            f"num_experts={spec.num_experts}"
        )
    counts = report(spec)
    routed = counts.breakdown["routed_experts"]
    per_rank = counts.total - routed + routed // expert_parallel
    width = BYTES_PER_PARAM[dtype]
    optimizer_per_param = 8.0 + (4.0 if dtype != "fp32" else 0.0)  # moments (+ master copy)
    leaving = (expert_parallel - 1) / expert_parallel
    traffic = spec.moe_layers * 4 * tokens_per_rank * spec.top_k * spec.d_model * width * leaving
    weights = per_rank * width
    grads = per_rank * width
    optimizer = per_rank * optimizer_per_param
    return RankPlan(
        expert_parallel=expert_parallel,
        tokens_per_rank=tokens_per_rank,
        dtype=dtype,
        params_per_rank=per_rank,
        weight_bytes=weights,
        gradient_bytes=grads,
        optimizer_bytes=optimizer,
        total_bytes=weights + grads + optimizer,
        all_to_all_bytes_per_step=traffic,
    )
