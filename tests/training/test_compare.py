from pathlib import Path

import pytest

from moekit.analysis.params import ParamReport
from moekit.training.compare import Comparison
from moekit.training.loop import TrainResult


def _run(evals: list[tuple[int, float, float]]) -> TrainResult:
    """A finished run whose records hold (step, val_loss, train_seconds)."""
    records = [{"step": s, "val_loss": v, "train_seconds": t} for s, v, t in evals]
    return TrainResult(model=None, out_dir=Path("."), records=records)  # type: ignore[arg-type]


def _params() -> ParamReport:
    return ParamReport(
        name="m",
        total=1,
        active=1,
        active_non_embedding=1,
        breakdown={},
        active_breakdown={},
        flops_per_token=0,
        context=0,
        weight_bytes={},
    )


def test_steps_and_training_time_to_the_dense_loss():
    dense = _run([(10, 2.0, 5.0), (20, 1.5, 10.0), (30, 1.2, 15.0)])
    moe = _run([(10, 1.8, 6.0), (20, 1.19, 12.0), (30, 1.0, 18.0)])
    comparison = Comparison(dense, moe, _params(), _params())
    assert comparison.moe_steps_to_dense_loss == 20
    assert comparison.step_ratio == pytest.approx(20 / 30)
    assert comparison.time_ratio == pytest.approx(12.0 / 15.0)  # slower steps, fewer of them
    assert "0.80x the dense model's" in comparison.table()
    never = Comparison(dense, _run([(30, 1.3, 9.0)]), _params(), _params())
    assert never.moe_steps_to_dense_loss is None and never.time_ratio is None
