"""The training methods of the seeds' table: each lowers the error and freezes exactly what it
says it freezes."""

import pytest
import torch

from moekit.classic.methods import (
    AlternatingSchedule,
    TrainingMethod,
    fit_mixture,
    mixture_groups,
)
from moekit.classic.mixture import MixtureOfLocalExperts


def _data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 4 - 2
    y = torch.where(x < 0, 2 * x, -3 * x + 1) + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


def _model(seed=0):
    torch.manual_seed(seed)
    return MixtureOfLocalExperts(1, 1, 2, learn_variance=True)


@pytest.mark.parametrize("method", ["joint", "gradient", "separate", "alternating"])
def test_every_gradient_method_lowers_the_error(method):
    x, y = _data()
    model = _model()
    curve = fit_mixture(model, x, y, method=method, epochs=200)
    assert curve[-1] < curve[0] - 0.5


def test_evolutionary_lowers_the_error_within_its_budget():
    pytest.importorskip("cma")
    x, y = _data()
    model = _model()
    before = float(model.loss(x, y, "competitive"))
    curve = fit_mixture(model, x, y, method="evolutionary", budget=600)
    assert curve[-1] < before - 0.3
    assert float(model.loss(x, y, "competitive")) == pytest.approx(curve[-1])


def _changed(before, model):
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}


def test_separate_trains_experts_then_the_router_alone():
    x, y = _data()
    model = _model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit_mixture(model, x, y, method="separate", epochs=2)  # one expert epoch, one router epoch
    changed = _changed(start, model)
    assert changed == {n for n, _ in model.named_parameters()} - {"log_variance_K"}
    # now only the router phase: experts stay as they are
    middle = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit_mixture(model, x, y, method="separate", epochs=2, partition_N=(x[:, 0] > 0).long())
    router = {n for n, _ in model.named_parameters() if n.startswith("gate.")}
    assert router <= _changed(middle, model)


def test_alternating_freezes_the_other_group_in_each_block():
    x, y = _data()
    model = _model()
    groups = {name: p for name, p in model.named_parameters()}
    schedule = AlternatingSchedule(expert_steps=1, router_steps=1)
    seen = []

    def record(epoch, _):
        seen.append({n: p.detach().clone() for n, p in groups.items()})

    start = {n: p.detach().clone() for n, p in groups.items()}
    fit_mixture(model, x, y, method="alternating", epochs=2, schedule=schedule, on_epoch=record)
    gate = {n for n in groups if n.startswith("gate.")}
    after_expert_step = {n for n in groups if not torch.equal(start[n], seen[0][n])}
    after_router_step = {n for n in groups if not torch.equal(seen[0][n], seen[1][n])}
    assert after_expert_step == set(groups) - gate
    assert after_router_step == gate
    assert set(mixture_groups(model)) == {"router", "experts"}


def test_bad_method_inputs_are_refused():
    x, y = _data(20)
    with pytest.raises(ValueError, match=r"HME\.fit_em"):
        fit_mixture(_model(), x, y, method="em")
    with pytest.raises(ValueError, match="method must be one of 'joint'"):
        fit_mixture(_model(), x, y, method="fancy")
    with pytest.raises(ValueError, match="one expert index"):
        fit_mixture(_model(), x, y, method="separate", partition_N=torch.full((20,), 5))
    with pytest.raises(ValueError, match="expert_steps and router_steps must be >= 1"):
        AlternatingSchedule(expert_steps=0)
    assert TrainingMethod("alternating") is TrainingMethod.ALTERNATING
