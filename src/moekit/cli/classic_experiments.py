"""Measured comparisons of the classic mixtures and their training methods (``moekit classic``).

Data that ships offline and that no one on the project wrote: scikit-learn's bundled
``load_digits``, ``load_wine``, ``load_breast_cancer`` (classification) and ``load_diabetes``
(regression), plus the inverse dynamics of a two-link planar arm (Jordan & Jacobs' kind of
task), generated from its closed-form equations of motion: joint torques from angles,
velocities and accelerations.

For each data set, method and seed: the validation score after every epoch (one full-batch
step; one EM iteration; one CMA-ES generation), the epochs and seconds to reach a target (97% of
the single network's final validation score), and the final score. The single network is a
one-hidden-layer MLP with about as many parameters as the mixture.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from moekit.classic.glm import with_bias
from moekit.classic.hme import HME, ExpertKind
from moekit.classic.methods import fit_mixture
from moekit.classic.mixture import MixtureOfLocalExperts

METHODS = ("single", "joint", "separate", "alternating", "evolutionary", "hme_em", "hme_gradient")


def two_link_arm(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(X (n, 6), torques (n, 2))``: angles, velocities, accelerations -> joint torques of a
    two-link planar arm in a vertical plane (uniform rods of 1 kg, lengths 1 m and 0.8 m)."""
    rng = np.random.RandomState(seed)
    q1, q2 = rng.uniform(-math.pi, math.pi, (2, n))
    dq1, dq2 = rng.uniform(-2, 2, (2, n))
    ddq1, ddq2 = rng.uniform(-4, 4, (2, n))
    m1 = m2 = 1.0
    l1, l2 = 1.0, 0.8
    c1, c2 = l1 / 2, l2 / 2  # centres of mass
    i1, i2 = m1 * l1**2 / 12, m2 * l2**2 / 12
    g = 9.81
    m11 = m1 * c1**2 + m2 * (l1**2 + c2**2 + 2 * l1 * c2 * np.cos(q2)) + i1 + i2
    m12 = m2 * (c2**2 + l1 * c2 * np.cos(q2)) + i2
    m22 = m2 * c2**2 + i2
    h = -m2 * l1 * c2 * np.sin(q2)
    g1 = (m1 * c1 + m2 * l1) * g * np.cos(q1) + m2 * c2 * g * np.cos(q1 + q2)
    g2 = m2 * c2 * g * np.cos(q1 + q2)
    tau1 = m11 * ddq1 + m12 * ddq2 + h * dq2**2 + 2 * h * dq1 * dq2 + g1
    tau2 = m12 * ddq1 + m22 * ddq2 - h * dq1**2 + g2
    X = np.stack([np.cos(q1), np.sin(q1), np.cos(q2), np.sin(q2), dq1, dq2, ddq1, ddq2], 1)
    return X, np.stack([tau1, tau2], 1)


def load(name: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(X, y, classification)`` of a data set by name."""
    from sklearn import datasets

    if name == "arm":
        X, y = two_link_arm()
        return X, y, False
    loader = {
        "digits": datasets.load_digits,
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
        "diabetes": datasets.load_diabetes,
    }[name]
    X, y = loader(return_X_y=True)
    return X, y, name != "diabetes"


@dataclass
class Run:
    """One method on one data set with one seed."""

    curve: list[float]  # validation score after each epoch (accuracy, or R^2)
    seconds: float
    parameters: int
    epochs_to_target: int | None = None
    seconds_to_target: float | None = None


@dataclass
class Table:
    rows: dict[str, list[Run]] = field(default_factory=dict)
    target: float = 0.0


def _score(pred: torch.Tensor, y: torch.Tensor, classification: bool) -> float:
    if classification:
        return float((pred.argmax(1) == y).double().mean())
    residual = ((y - pred) ** 2).sum()
    return float(1 - residual / ((y - y.mean(0)) ** 2).sum())


def run_method(method: str, data, *, experts: int, epochs: int, seed: int, budget: int) -> Run:
    """Train ``method`` on ``data`` (a split from :func:`split`), recording validation scores."""
    xt, yt, xv, yv, classification = data
    n_in = xt.shape[1]
    n_out = int(yt.max()) + 1 if classification else yt.shape[1]
    torch.manual_seed(seed)
    curve: list[float] = []
    start = time.perf_counter()
    if method.startswith("hme"):
        depth = max(1, round(math.log2(experts)))
        model = HME(
            n_in,
            n_out,
            kind=ExpertKind.SOFTMAX if classification else ExpertKind.GAUSSIAN,
            depth=depth,
            generator=torch.Generator().manual_seed(seed),
        )
        Xt, Xv = with_bias(xt), with_bias(xv)

        def record() -> None:
            with torch.no_grad():
                curve.append(_score(model.predict(Xv), yv, classification))

        if method == "hme_em":
            for _ in range(min(epochs, 60)):
                model.em_step(Xt, yt)
                record()
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
            for _ in range(epochs):
                optimizer.zero_grad()
                (-model.objective(Xt, yt) / len(Xt)).backward()
                optimizer.step()
                record()
        parameters = sum(p.numel() for p in model.parameters())
    elif method == "single":
        # about as many parameters as the mixture of linear experts with a linear gate
        mixture = experts * (n_in + 1) * n_out + (n_in + 1) * experts + experts
        hidden = max(2, round((mixture - n_out) / (n_in + 1 + n_out)))
        net = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out)).double()
        optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
        loss_fn = nn.CrossEntropyLoss() if classification else nn.MSELoss()
        for _ in range(epochs):
            optimizer.zero_grad()
            loss_fn(net(xt), yt.long() if classification else yt).backward()
            optimizer.step()
            with torch.no_grad():
                curve.append(_score(net(xv), yv, classification))
        parameters = sum(p.numel() for p in net.parameters())
    else:
        mixture = MixtureOfLocalExperts(
            n_in, n_out, experts, classification=classification, learn_variance=True
        ).double()

        def on_epoch(_epoch: int, _error: float) -> None:
            with torch.no_grad():
                curve.append(_score(mixture.predict(xv), yv, classification))

        fit_mixture(
            mixture,
            xt,
            yt,
            method=method,
            epochs=epochs,
            budget=budget,
            seed=seed,
            on_epoch=on_epoch,
        )
        parameters = sum(p.numel() for p in mixture.parameters())
    seconds = time.perf_counter() - start
    return Run(curve, seconds, parameters)


def split(X: np.ndarray, y: np.ndarray, classification: bool, seed: int):
    """Standardised 75/25 train/validation tensors (float64)."""
    from sklearn.model_selection import train_test_split

    xt, xv, yt, yv = train_test_split(
        X, y, test_size=0.25, random_state=seed, stratify=y if classification else None
    )
    mean, scale = xt.mean(0), np.where(xt.std(0) > 0, xt.std(0), 1)
    xt, xv = (xt - mean) / scale, (xv - mean) / scale
    if not classification:
        yt, yv = yt.reshape(len(yt), -1), yv.reshape(len(yv), -1)
        ym, ys = yt.mean(0), yt.std(0)
        yt, yv = (yt - ym) / ys, (yv - ym) / ys
    as_t = torch.as_tensor
    return as_t(xt), as_t(yt), as_t(xv), as_t(yv), classification


def compare(
    dataset: str,
    *,
    methods: tuple[str, ...] = METHODS,
    seeds: int = 5,
    experts: int = 4,
    epochs: int = 300,
    budget: int = 3000,
) -> Table:
    """Every method on ``dataset`` over ``seeds`` seeds; fills in epochs/seconds to target."""
    X, y, classification = load(dataset)
    table = Table()
    for seed in range(seeds):
        data = split(X, y, classification, seed)
        for method in methods:
            table.rows.setdefault(method, []).append(
                run_method(method, data, experts=experts, epochs=epochs, seed=seed, budget=budget)
            )
    single = [run.curve[-1] for run in table.rows.get("single", [])]
    table.target = 0.97 * statistics.median(single) if single else 0.0
    for runs in table.rows.values():
        for run in runs:
            reached = next((i for i, s in enumerate(run.curve) if s >= table.target), None)
            if reached is not None:
                run.epochs_to_target = reached + 1
                run.seconds_to_target = run.seconds * (reached + 1) / len(run.curve)
    return table


def summary_rows(table: Table) -> list[dict[str, Any]]:
    """Medians and spreads over seeds, one row per method."""
    rows = []
    for method, runs in table.rows.items():
        reached = [r.epochs_to_target for r in runs if r.epochs_to_target is not None]
        secs = [r.seconds_to_target for r in runs if r.seconds_to_target is not None]
        finals = [r.curve[-1] for r in runs]
        rows.append(
            {
                "method": method,
                "parameters": runs[0].parameters,
                "reached": f"{len(reached)}/{len(runs)}",
                "epochs_to_target": statistics.median(reached) if reached else None,
                "epochs_range": (min(reached), max(reached)) if reached else None,
                "seconds_to_target": statistics.median(secs) if secs else None,
                "final": statistics.median(finals),
                "final_range": (min(finals), max(finals)),
            }
        )
    return rows


def em_vs_gradient(
    dataset: str,
    *,
    seeds: int = 5,
    experts: int = 4,
    em_iterations: int = 100,
    max_epochs: int = 3000,
    learning_rate: float = 0.02,
    tolerance: float = 1e-3,
) -> dict[str, Any]:
    """The same HME (same initial parameters) trained by EM and by gradient (Adam, full batch),
    each until its training objective (log-likelihood minus the ridge penalty) comes within
    ``tolerance`` nats per sample of what EM converges to: iterations/epochs and seconds to that
    likelihood, median and range over seeds (``reached``: how many gradient runs got there
    within ``max_epochs``)."""
    import copy

    X, y, classification = load(dataset)
    em_its, em_secs, gd_its, gd_secs = [], [], [], []
    for seed in range(seeds):
        xt, yt, _xv, _yv, _ = split(X, y, classification, seed)
        Xt = with_bias(xt)
        model = HME(
            xt.shape[1],
            int(yt.max()) + 1 if classification else yt.shape[1],
            kind=ExpertKind.SOFTMAX if classification else ExpertKind.GAUSSIAN,
            depth=max(1, round(math.log2(experts))),
            generator=torch.Generator().manual_seed(seed),
        )
        gradient_model = copy.deepcopy(model)
        start = time.perf_counter()
        history = model.fit_em(Xt, yt, iterations=em_iterations, tol=1e-9)
        em_seconds = time.perf_counter() - start
        target = history.objective[-1] - tolerance * len(Xt)
        reached = next(i for i, v in enumerate(history.objective) if v >= target)
        em_its.append(reached)
        em_secs.append(em_seconds * reached / max(1, len(history.objective) - 1))
        optimizer = torch.optim.Adam(gradient_model.parameters(), lr=learning_rate)
        start = time.perf_counter()
        for epoch in range(1, max_epochs + 1):
            optimizer.zero_grad()
            objective = gradient_model.objective(Xt, yt)
            (-objective / len(Xt)).backward()
            optimizer.step()
            if float(objective.detach()) >= target:  # the objective before this step
                gd_its.append(epoch - 1)
                gd_secs.append(time.perf_counter() - start)
                break

    def spread(values: list) -> dict[str, Any]:
        if not values:
            return {"median": None, "range": None}
        return {"median": statistics.median(values), "range": (min(values), max(values))}

    return {
        "dataset": dataset,
        "seeds": seeds,
        "em_iterations": spread(em_its),
        "em_seconds": spread(em_secs),
        "gradient_epochs": spread(gd_its),
        "gradient_seconds": spread(gd_secs),
        "gradient_reached": f"{len(gd_its)}/{seeds}",
    }
