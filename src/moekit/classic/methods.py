"""The MoE training methods of the seeds' table, for the classic mixtures (and, through
``moekit.training``, for the MoE language model).

* ``joint``: router (gate) and experts together, every step (the default everywhere);
* ``gradient``: plain backpropagation on the whole mixture (the same as joint for gradient
  models);
* ``separate``: experts first, each on its own partition of the data (k-means or a given
  split), router frozen; then the router alone, experts frozen;
* ``alternating``: blocks of steps, experts with the router frozen, then the router with the
  experts frozen (``AlternatingSchedule``);
* ``em``: expectation-maximisation (the hierarchical mixture, ``HME.fit_em``);
* ``evolutionary``: CMA-ES (the ``cma`` package) over every parameter, with an evaluation
  budget.

Legend: N = samples, I = inputs, K = experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moekit.classic.mixture import ErrorFunction, MixtureOfLocalExperts
from moekit.utils.schedule import AlternatingSchedule, TrainingMethod, drop_gradients
from moekit.utils.validation import coerce

__all__ = ["AlternatingSchedule", "TrainingMethod", "drop_gradients", "fit_mixture"]


def mixture_groups(model: MixtureOfLocalExperts) -> dict[str, list[nn.Parameter]]:
    """``router`` (the gate) and ``experts`` (expert networks and their variances)."""
    experts = list(model.experts.parameters())
    if model.log_variance_K is not None:
        experts.append(model.log_variance_K)
    return {"router": list(model.gate.parameters()), "experts": experts}


def fit_mixture(
    model: MixtureOfLocalExperts,
    x_NI: torch.Tensor,
    y: torch.Tensor,
    *,
    method: TrainingMethod | str = TrainingMethod.JOINT,
    error: ErrorFunction | str = ErrorFunction.COMPETITIVE,
    epochs: int = 300,
    learning_rate: float = 0.02,
    schedule: AlternatingSchedule | None = None,
    partition_N: torch.Tensor | None = None,
    budget: int = 2000,
    seed: int = 0,
    tol: float = 0.0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` (full batch) by ``method``; returns the error after each epoch.

    Args:
        model: the mixture to train (in place).
        x_NI: ``(N, I)`` inputs.
        y: the targets (``(N, Q)`` for regression, ``(N,)`` class labels for classification).
        method: ``joint``/``gradient``, ``separate``, ``alternating`` or ``evolutionary``.
        error: the mixture's error (``cooperative`` or ``competitive``).
        epochs: gradient epochs (``separate``: half for the experts, half for the router).
        learning_rate: Adam's step for the gradient methods.
        schedule: blocks for ``alternating`` (default 10 + 10).
        partition_N: ``separate``: each sample's expert (``0..K-1``); default k-means on x.
        budget: ``evolutionary``: loss evaluations allowed to CMA-ES.
        seed: k-means and CMA-ES seed.
        tol: stop early once ten epochs gain less than ``tol`` (relative; 0: never).
        on_epoch: called with ``(epoch, error)`` (learning curves).
    """
    method = coerce(method, TrainingMethod, "method")
    error = coerce(error, ErrorFunction, "error")
    if method is TrainingMethod.EM:
        raise ValueError("method='em' needs the hierarchical mixture (HME.fit_em)")
    if method is TrainingMethod.EVOLUTIONARY:
        return _fit_evolutionary(model, x_NI, y, error, budget, seed, on_epoch)
    groups = mixture_groups(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    curve: list[float] = []
    if method is TrainingMethod.SEPARATE:
        if partition_N is None:
            partition_N = kmeans_partition(x_NI, model.n_experts, seed)
        if (
            partition_N.shape != (len(x_NI),)
            or not 0 <= int(partition_N.min()) <= int(partition_N.max()) < model.n_experts
        ):
            raise ValueError(
                f"partition_N must hold one expert index in [0, {model.n_experts}) per sample"
            )
    schedule = schedule or AlternatingSchedule()
    for epoch in range(epochs):
        optimizer.zero_grad()
        if method is TrainingMethod.SEPARATE and epoch < epochs // 2:
            loss = _own_partition_error(model, x_NI, y, partition_N)  # type: ignore[arg-type]
            frozen = groups["router"]
        else:
            loss = model.loss(x_NI, y, error)
            frozen = []
            if method is TrainingMethod.SEPARATE:
                frozen = groups["experts"]
            elif method is TrainingMethod.ALTERNATING:
                frozen = groups["experts"] if schedule.trains_router(epoch) else groups["router"]
        loss.backward()
        drop_gradients(frozen)
        optimizer.step()
        with torch.no_grad():
            curve.append(float(model.loss(x_NI, y, error)))
        if on_epoch is not None:
            on_epoch(epoch, curve[-1])
        stalled = len(curve) > 10 and curve[-11] - curve[-1] < tol * max(1.0, abs(curve[-1]))
        in_expert_phase = method is TrainingMethod.SEPARATE and epoch < epochs // 2
        if tol and stalled and not in_expert_phase:
            break
    return curve


def kmeans_partition(x_NI: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Each sample's k-means cluster (scikit-learn's ``KMeans``), ``(N,)`` long."""
    from sklearn.cluster import KMeans  # noqa: PLC0415 (optional: sklearn)

    labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x_NI.detach().numpy())
    return torch.as_tensor(labels, dtype=torch.long)


def _own_partition_error(
    model: MixtureOfLocalExperts, x_NI: torch.Tensor, y: torch.Tensor, partition_N: torch.Tensor
) -> torch.Tensor:
    """Each expert's own error on its partition only (squared error or cross-entropy)."""
    _, outputs_NKQ = model(x_NI)
    mine_NQ = outputs_NKQ[torch.arange(len(x_NI)), partition_N]
    if model.classification:
        return torch.nn.functional.cross_entropy(mine_NQ, y.long())
    return ((y - mine_NQ) ** 2).sum(dim=-1).mean()


def _fit_evolutionary(
    model: nn.Module,
    x_NI: torch.Tensor,
    y: torch.Tensor,
    error: ErrorFunction | str,
    budget: int,
    seed: int,
    on_epoch: Callable[[int, float], None] | None,
) -> list[float]:
    """CMA-ES (Hansen's ``cma`` package) on the flat parameter vector (separable CMA-ES above
    200 parameters); one curve point per generation (the best error so far)."""
    import cma  # noqa: PLC0415 (optional: cma)

    params = list(model.parameters())
    start = torch.nn.utils.parameters_to_vector(params).detach().double().numpy()

    def error_of(vector) -> float:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.as_tensor(vector, dtype=params[0].dtype), params
            )
            return float(model.loss(x_NI, y, error))  # type: ignore[operator]

    options = {"maxfevals": budget, "seed": seed + 1, "verbose": -9}
    if len(start) > 200:  # separable CMA-ES: a full covariance costs O(n^3) per update
        options["CMA_diagonal"] = True
    strategy = cma.CMAEvolutionStrategy(start, 0.1, options)
    curve: list[float] = []
    while not strategy.stop():
        candidates = strategy.ask()
        strategy.tell(candidates, [error_of(c) for c in candidates])
        curve.append(float(strategy.result.fbest))
        if on_epoch is not None:
            on_epoch(len(curve) - 1, curve[-1])
    error_of(strategy.result.xbest)  # leave the best parameters in the model
    return curve
