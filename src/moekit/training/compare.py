"""Dense vs MoE at equal active parameters: the experiment behind ``moekit demo``.

Both models share every setting (data, tokens, steps, optimizer, schedule, seed); the MoE model
replaces each dense FFN of hidden width ``h`` by ``E`` experts of width ``h / k`` with top-``k``
routing, so each token meets the same number of FFN parameters.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from moekit.analysis.params import ParamReport, count_parameters
from moekit.dispatch.dispatcher import DispatchConfig
from moekit.experts.bank import ExpertConfig
from moekit.experts.shared import SharedExpertConfig
from moekit.layers import MoEConfig
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.training.config import TrainConfig
from moekit.training.loop import TrainResult


def moe_twin(
    config: TrainConfig,
    num_experts: int,
    top_k: int,
    dispatch: DispatchConfig | None = None,
    shared_hidden: int = 0,
) -> TrainConfig:
    """``config`` with every FFN an MoE at the same active FFN FLOPs per token as the dense
    model: a shared expert of width ``shared_hidden`` (0: none) plus ``num_experts`` routed
    experts of width ``(ffn_hidden - shared_hidden) / top_k``, top-k softmax routing."""
    model = config.model
    if not isinstance(model, TransformerConfig):
        raise ValueError("the dense/MoE comparison builds decoder-only models")
    routed = model.ffn_hidden - shared_hidden
    if shared_hidden < 0 or routed < top_k or routed % top_k:
        raise ValueError(
            f"ffn_hidden={model.ffn_hidden} minus shared_hidden={shared_hidden} must be a "
            f"positive multiple of top_k={top_k}"
        )
    layer = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        experts=ExpertConfig(hidden=routed // top_k, activation=model.activation),
        dispatch=dispatch or DispatchConfig(),
        shared_experts=(
            SharedExpertConfig(hidden=shared_hidden, activation=model.activation)
            if shared_hidden
            else None
        ),
    )
    moe_model = dataclasses.replace(model, moe=MoEPlacementConfig(layer=layer))
    return dataclasses.replace(config, model=moe_model)


def steps_to_reach(evals: list[tuple[int, float]], target: float) -> int | None:
    """First evaluated step whose validation loss is at or below ``target``."""
    return next((step for step, loss in evals if loss <= target), None)


@dataclass
class Comparison:
    dense: TrainResult
    moe: TrainResult
    dense_params: ParamReport
    moe_params: ParamReport

    @property
    def target(self) -> float:
        return self.dense.final_val_loss

    @property
    def moe_steps_to_dense_loss(self) -> int | None:
        return steps_to_reach(self.moe.evals, self.target)

    @property
    def dense_steps(self) -> int:
        return self.dense.evals[-1][0]

    @property
    def step_ratio(self) -> float | None:
        steps = self.moe_steps_to_dense_loss
        return None if steps is None else steps / self.dense_steps

    @property
    def time_ratio(self) -> float | None:
        """Training seconds the MoE took to reach the dense model's final validation loss over
        the dense model's training seconds for its whole run (evaluation excluded)."""
        steps = self.moe_steps_to_dense_loss
        if steps is None:
            return None
        moe_seconds = _train_seconds_at(self.moe, steps)
        dense_seconds = _train_seconds_at(self.dense, self.dense_steps)
        if moe_seconds is None or not dense_seconds:
            return None
        return moe_seconds / dense_seconds

    def table(self) -> str:
        rows = [
            ("model", "total params", "active/token", "val loss", "val ppl", "tokens/s", "wall s")
        ]
        for name, run, params in (
            ("dense", self.dense, self.dense_params),
            ("moe", self.moe, self.moe_params),
        ):
            rows.append(
                (
                    name,
                    f"{params.total:,}",
                    f"{params.active:,}",
                    f"{run.final_val_loss:.4f}",
                    f"{math.exp(run.final_val_loss):.3f}",
                    f"{run.tokens_per_second:,.0f}",
                    f"{run.wall_time:.1f}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        ]
        steps, ratio = self.moe_steps_to_dense_loss, self.step_ratio
        if steps is None or ratio is None:
            lines.append(
                f"MoE did not reach the dense model's final validation loss "
                f"({self.target:.4f}) within {self.dense_steps} steps."
            )
        else:
            lines.append(
                f"MoE reached the dense model's final validation loss ({self.target:.4f}) "
                f"at step {steps} of {self.dense_steps}: {ratio:.2f}x the "
                f"dense model's steps ({1 / ratio:.2f}x fewer)."
            )
            time_ratio = self.time_ratio
            if time_ratio is not None:
                lines.append(
                    f"In training time (evaluation excluded) that is {time_ratio:.2f}x the "
                    "dense model's."
                )
        return "\n".join(lines)


def _train_seconds_at(run: TrainResult, step: int) -> float | None:
    """Training seconds up to ``step`` from the run's records (``None`` if not recorded)."""
    return next(
        (r["train_seconds"] for r in run.records if r["step"] == step and "train_seconds" in r),
        None,
    )


def param_reports(dense: TrainConfig, moe: TrainConfig) -> tuple[ParamReport, ParamReport]:
    return count_parameters(dense.model), count_parameters(moe.model)
