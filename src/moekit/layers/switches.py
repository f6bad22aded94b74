"""Every model-wide switch in one place, over one walker that finds MoE layers and routers by
type: serving, routing statistics on and off, the number of experts per token, recording and
replaying routes, the auxiliary-loss-free bias update, and collecting every layer's output.

Routing at run time (record, replay, change k): reinforcement-learning fine-tuning of MoE models
collapses when the experts chosen while generating differ from those chosen while training on
the same tokens; replaying the generation-time routes at training time removes that gap while
the combine weights still come from the live router, so it keeps learning.

    with moekit.record_routing(model) as trace:
        model(tokens)
    trace.save("routes.safetensors")
    with moekit.replay_routing(model, moekit.RoutingTrace.load("routes.safetensors")):
        loss = model(tokens).logits...      # same experts, live weights, router gradients

Collecting outputs: one call for all auxiliary losses (forward hooks registered on entry and
removed on exit; nothing is stored globally).

    with collect_moe_outputs(model) as moe_outputs:
        logits = model(x)
    loss = task_loss + moe_outputs.aux_loss()
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from moekit.layers.moe import MoE, MoEOutput
from moekit.layers.statistics import RoutingStats
from moekit.losses.global_batch import BalanceTally
from moekit.routing.engine_routes import TokenRoutes
from moekit.routing.expert_threshold import ExpertThresholdRouter
from moekit.routing.null_slots import NullSlots
from moekit.routing.result import RoutingResult
from moekit.routing.sparsemixer import SparseMixerRouter
from moekit.routing.topk import TopKRouter
from moekit.routing.trace import RoutingTrace
from moekit.utils.randomness import active_rows


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer of ``model`` (nested ones included), in module order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def moe_routers(model: nn.Module) -> list[tuple[str, Any]]:
    """``(name, router)`` of every MoE layer's router in ``model``, in module order."""
    return [
        (f"{name}.router" if name else "router", module.router)
        for name, module in model.named_modules()
        if isinstance(module, MoE)
    ]


@contextmanager
def _layer_switches(model: nn.Module, **values: bool) -> Iterator[int]:
    """Set boolean attributes of every MoE layer of ``model`` inside the block (and of any other
    routed module that has them: a mixture of attention heads' ``losses_enabled``); restore them
    on exit. Yields how many MoE layers it switched."""
    layers: list[nn.Module] = list(moe_layers(model))
    others = [m for m in model.modules() if not isinstance(m, MoE) and hasattr(m, "losses_enabled")]
    touched = layers + others
    saved = [{n: getattr(m, n) for n in values if hasattr(m, n)} for m in touched]
    for module, attributes in zip(touched, saved, strict=True):
        for name in attributes:
            setattr(module, name, values[name])
    try:
        yield len(layers)
    finally:
        for module, attributes in zip(touched, saved, strict=True):
            for name, value in attributes.items():
                setattr(module, name, value)


@contextmanager
def serving(model: nn.Module) -> Iterator[int]:
    """Inside the block, every MoE layer of ``model`` skips its auxiliary losses (``aux_loss``
    is 0 and ``losses`` empty) and its routing statistics (``stats`` is ``None``): the work
    generation never reads (``moekit.models.generate`` uses it). Routing and outputs are
    unchanged. Yields how many layers it switched; their settings are restored on exit.
    """
    with _layer_switches(model, losses_enabled=False, statistics=False) as count:
        yield count


def set_statistics(model: nn.Module, enabled: bool) -> int:
    """Turn routing statistics on or off in every MoE layer of ``model`` (off: no statistics
    work and no host syncs, e.g. for ``torch.compile``); returns how many layers changed.
    :func:`without_statistics` does the same for one block."""
    layers = moe_layers(model)
    for layer in layers:
        layer.statistics = enabled
    return len(layers)


@contextmanager
def without_statistics(model: nn.Module) -> Iterator[int]:
    """Inside the block, every MoE layer of ``model`` skips its routing statistics (``stats`` is
    ``None``; under expert parallelism that also saves their all-reduces). Outputs, auxiliary
    losses and bias-balancing tallies are unchanged. The training loop uses it on steps that
    write no metrics line. Yields how many layers it switched; settings are restored on exit.
    """
    with _layer_switches(model, statistics=False) as count:
        yield count


@contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingTrace]:
    """Record every router call inside the ``with`` block (on the CPU, detached)."""
    routers = moe_routers(model)
    if not routers:
        raise ValueError("the model has no routers to record")
    trace = RoutingTrace(
        names=[n for n, _ in routers], num_experts=[int(m.num_experts) for _, m in routers]
    )
    trace.expert_idx = [[] for _ in routers]
    trace.weights = [[] for _ in routers]
    handles = []
    for r, (_, router) in enumerate(routers):

        def hook(_module, _inputs, output, r=r):
            if isinstance(output, RoutingResult):
                trace.expert_idx[r].append(output.expert_idx_TK.detach().cpu())
                trace.weights[r].append(output.weights_TK.detach().float().cpu())

        handles.append(router.register_forward_hook(hook))
    try:
        yield trace
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replay_routing(model: nn.Module, trace: RoutingTrace | TokenRoutes) -> Iterator[None]:
    """Inside the block, every token-choice top-k router takes replayed experts; the combine
    weights come from the live router's scores at those experts (gradients reach each one).

    Args:
        model: the model whose routers replay.
        trace: a :class:`RoutingTrace` (moekit's own record, replayed call by call in recorded
            order) or :class:`~moekit.routing.engine_routes.TokenRoutes` (an engine's routes,
            ``(B, S, L, K)``, keyed by token position: the same routes under activation
            checkpointing and any micro-batching; ``-1`` routes a token live). Run the
            backward inside the block when activation checkpointing recomputes the forward.

    Raises:
        ValueError: a trace of other routers, or routes whose layer count, ``k``, expert ids or
            token count do not fit the model (each named).
    """
    if isinstance(trace, TokenRoutes):
        with _replay_token_routes(model, trace):
            yield
        return
    routers = moe_routers(model)
    if [int(m.num_experts) for _, m in routers] != trace.num_experts:
        raise ValueError(
            f"the trace was recorded on routers with {trace.num_experts} experts; this model's "
            f"have {[int(m.num_experts) for _, m in routers]} (a trace from another model?)"
        )
    topk = _replayable(routers)
    for r, (name, router) in enumerate(topk):
        calls = iter(trace.expert_idx[r])

        def next_routes(num_tokens: int, calls=calls, name=name) -> torch.Tensor:
            try:
                return next(calls)
            except StopIteration:
                raise ValueError(f"{name} is called more often than the trace recorded") from None

        router.forced_routes = next_routes
    try:
        yield
    finally:
        for _, router in topk:
            router.forced_routes = None


def _replayable(routers: list[tuple[str, Any]]) -> list[tuple[str, Any]]:

    for name, router in routers:
        if not isinstance(router, TopKRouter | SparseMixerRouter):
            raise ValueError(
                f"{name} is a {type(router).__name__}; replay needs token-choice top-k routers"
            )
    return routers


def _moe_block_indices(model: nn.Module, count: int) -> list[int] | None:
    """Block index of each MoE layer, when the model says (a decoder's ``config``)."""
    config = getattr(model, "config", None)
    moe = getattr(config, "moe", None)
    n_layers = getattr(config, "n_layers", None)
    if moe is None or n_layers is None or not hasattr(moe, "is_moe_layer"):
        return None
    layers = [i for i in range(n_layers) if moe.is_moe_layer(i)]
    return layers if len(layers) == count else None


@contextmanager
def _replay_token_routes(model: nn.Module, routes: TokenRoutes) -> Iterator[None]:

    topk = _replayable(moe_routers(model))
    if not topk:
        raise ValueError("the model has no routers to replay")
    L = routes.num_layers
    blocks = _moe_block_indices(model, len(topk))
    n_layers = getattr(getattr(model, "config", None), "n_layers", None)
    if len(topk) == L:
        layer_of = list(range(L))
    elif blocks is not None and n_layers == L:
        layer_of = blocks  # the engine's rows cover every layer; take the MoE layers'
    else:
        raise ValueError(
            f"the routes have {L} layers; this model has {len(topk)} MoE layers"
            + (f" of {n_layers} blocks" if n_layers is not None else "")
            + ": routes from another model?"
        )
    ids = routes.expert_idx_BSLK
    for (name, router), layer in zip(topk, layer_of, strict=True):
        if routes.top_k != router.top_k:
            raise ValueError(
                f"the routes have k={routes.top_k} experts per token; {name} routes "
                f"top_k={router.top_k}"
            )
        chosen = ids[:, :, layer]
        top = int(chosen.max()) if chosen.numel() else -1
        low = int(chosen.min()) if chosen.numel() else -1
        if top >= router.num_experts or low < -1:
            raise ValueError(
                f"layer {layer} of the routes names expert {top if low >= -1 else low}; {name} has "
                f"{router.num_experts} experts (ids 0..{router.num_experts - 1}, -1 = live)"
            )
        if isinstance(router, SparseMixerRouter) and bool((chosen < 0).any()):
            raise ValueError(f"{name} is a SparseMixer router: every token needs replayed routes")
    B, S = ids.shape[:2]
    # on the model's device once: no host-to-device copy per router call
    ids = ids.to(next(iter(topk[0][1].parameters())).device)
    for (name, router), layer in zip(topk, layer_of, strict=True):

        def routes_of_call(num_tokens: int, layer=layer, name=name) -> torch.Tensor:
            place = active_rows()
            offset, rows = (0, B) if place is None else place
            if offset + rows > B or num_tokens != rows * S:
                raise ValueError(
                    f"{name} routes {num_tokens} tokens, but the replayed routes hold rows "
                    f"{offset}..{offset + rows - 1} of {B} × {S} tokens: a token count mismatch"
                )
            return ids[offset : offset + rows, :, layer].reshape(rows * S, -1)

        router.forced_routes = routes_of_call
    try:
        yield
    finally:
        for _, router in topk:
            router.forced_routes = None


def set_top_k(model: nn.Module, k: int) -> int:
    """Route every token to ``k`` experts in every token-choice top-k router from now on (the
    weights are renormalised the way each router was trained: renormalised top-k stays
    renormalised, softmax-after-top-k re-softmaxes over the k). Returns how many routers
    changed. Raises for k outside ``[1, E]`` or beyond what group-limited routing allows."""
    routers = [(n, m) for n, m in moe_routers(model) if isinstance(m, TopKRouter)]
    if not routers:
        raise ValueError("the model has no token-choice top-k routers")
    for name, router in routers:
        cfg = router.config
        limit = router.num_experts
        if cfg.num_groups > 1:
            limit = cfg.topk_groups * (router.num_experts // cfg.num_groups)
        if not 1 <= k <= limit:
            raise ValueError(f"k must be in [1, {limit}] for {name}, got {k}")
    for _, router in routers:
        router.top_k = k
    return len(routers)


def _sum_over_ranks(tensors: list[torch.Tensor], group: Any = None) -> None:
    """Sum each tensor over ``group`` in place (one all-reduce; nothing without
    ``torch.distributed``)."""
    if not tensors or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def update_expert_thresholds(model: nn.Module, group: Any = None) -> int:
    """Fold the tallied expert-choice cuts of every Expert-Threshold router in ``model`` into
    its thresholds (``moekit.routing.expert_threshold``); returns how many routers updated.

    Args:
        model: any module containing moekit routers.
        group: a process group whose ranks saw different tokens: the tallies are summed over
            it first, so every rank keeps the same thresholds (``None``: this process only,
            or the whole world when ``torch.distributed`` is initialised).
    """

    routers = [m for m in model.modules() if isinstance(m, ExpertThresholdRouter)]
    _sum_over_ranks([t for r in routers for t in (r.cut_tally_E, r.cut_calls)], group)
    for router in routers:
        router.update_thresholds()
    return len(routers)


def _null_slots(model: nn.Module) -> list[tuple[str, TopKRouter, NullSlots]]:
    """``(name, router, its zero-expert offset)`` of every router that has one."""
    return [
        (name, router, router.null_slots)
        for name, router in moe_routers(model)
        if isinstance(router, TopKRouter) and router.null_slots is not None
    ]


def update_null_offsets(model: nn.Module, group: Any = None) -> int:
    """One controller step of every router whose zero experts steer the real experts per
    token to a target (``zero_computation.target_experts_per_token``); tallies summed over
    ``group`` first (as :func:`update_expert_thresholds`). Returns how many routers stepped."""
    slots = [s for _, _, s in _null_slots(model) if s.target is not None]
    _sum_over_ranks([s.tally for s in slots], group)
    for s in slots:
        s.update()
    return len(slots)


@torch.no_grad()
def set_compute_budget(
    model: nn.Module, experts_per_token: float, tokens: torch.Tensor, **forward_kwargs: Any
) -> list[float]:
    """Set every zero-expert offset so that ``tokens`` (a calibration batch) use
    ``experts_per_token`` real experts per token on average in each MoE layer: the elastic k
    of a model trained with zero experts (``moekit.routing.null_slots``). Layers are set in
    order, each on the inputs the earlier layers' new offsets give it (one forward per layer,
    then a bisection on the offset). Returns each layer's achieved average.

    Args:
        model: a model whose top-k routers score zero experts (``MoEConfig.zero_computation``).
        experts_per_token: the budget, in ``[0, k]``.
        tokens: the calibration input (no padding: every position counts).
        forward_kwargs: passed on as ``model(tokens, **forward_kwargs)``.
    """
    slots = _null_slots(model)
    if not slots:
        raise ValueError("the model has no zero experts (MoEConfig.zero_computation.zero)")
    achieved = []
    for name, router, s in slots:
        if not 0 <= experts_per_token <= router.top_k:
            raise ValueError(
                f"experts_per_token must be in [0, top_k={router.top_k}] for {name}, got "
                f"{experts_per_token}"
            )
        seen: list[torch.Tensor] = []
        handle = router.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0]))
        try:
            model(tokens, **forward_kwargs)
        finally:
            handle.remove()
        x_TD = torch.cat(seen)

        def real_per_token(offset: float, router=router, s=s, x_TD=x_TD) -> float:
            s.offset.fill_(offset)
            chosen = router._route(x_TD).expert_idx_TK
            return float((chosen < s.first).sum()) / max(chosen.shape[0], 1)

        low, high = -1.0, 1.0  # offsets beyond the scores' spread change nothing more
        while real_per_token(low) < experts_per_token and low > -1e6:
            low *= 2
        while real_per_token(high) > experts_per_token and high < 1e6:
            high *= 2
        for _ in range(40):  # real experts per token falls as the offset rises
            mid = (low + high) / 2
            if real_per_token(mid) > experts_per_token:
                low = mid
            else:
                high = mid
        # the side nearer the budget (the average moves in steps of 1/T)
        best = min((low, high), key=lambda o: abs(real_per_token(o) - experts_per_token))
        achieved.append(real_per_token(best))
    return achieved


def update_expert_bias(model: nn.Module, rate: float | None = None) -> int:
    """Update every bias-balancing router in ``model``; returns how many routers were updated.

    Args:
        model: any module containing moekit routers.
        rate: override each router's configured ``bias_update_rate``.
    """
    updated = 0
    for module in model.modules():
        if isinstance(module, TopKRouter) and module.expert_bias_E is not None:
            module.update_expert_bias(rate)
            updated += 1
    return updated


class MoEOutputCollector:
    """The MoE outputs seen during a ``collect_moe_outputs`` block, by module name."""

    def __init__(self) -> None:
        self.outputs: dict[str, list[MoEOutput]] = {}
        self.nested: set[str] = set()  # MoE layers inside another MoE (hierarchical experts)

    def aux_loss(self) -> torch.Tensor:
        """Sum of every collected call's weighted auxiliary loss (0 if none). Nested MoE layers
        are not added again: their losses are already inside their parent's ``aux_loss``."""
        device = next((c[0].aux_loss.device for c in self.outputs.values() if c), None)
        total = torch.zeros((), device=device)
        for name, calls in self.outputs.items():
            if name in self.nested:
                continue
            for out in calls:
                total = total + out.aux_loss
        return total

    def stats(self) -> dict[str, RoutingStats]:
        """The last call's routing statistics of each MoE layer (layers with statistics off
        are left out)."""
        return {
            name: stats
            for name, calls in self.outputs.items()
            if calls and (stats := calls[-1].stats) is not None
        }

    def clear(self) -> None:
        """Forget the outputs collected so far (the hooks stay until the block ends)."""
        self.outputs.clear()


@contextmanager
def collect_moe_outputs(model: nn.Module) -> Iterator[MoEOutputCollector]:
    """Record the ``MoEOutput`` of every ``MoE`` module in ``model`` (nested ones included)."""
    collector = MoEOutputCollector()
    handles = []
    moe_names = [name for name, m in model.named_modules() if isinstance(m, MoE)]
    collector.nested = {
        name
        for name in moe_names
        if any(p != name and (p == "" or name.startswith(p + ".")) for p in moe_names)
    }
    for name, module in model.named_modules():
        if isinstance(module, MoE):

            def hook(_module, _args, output, name=name or "<root>"):
                collector.outputs.setdefault(name, []).append(output)

            handles.append(module.register_forward_hook(hook))
    try:
        yield collector
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def global_batch_balance(
    model: nn.Module,
    run_pre_pass: Any,
    *,
    scale: float,
    devices: list[torch.device] | None = None,
) -> Iterator[int]:
    """Balance over the whole optimizer step (``aux_loss.*_scope = "global_batch"``).

    ``run_pre_pass()`` runs the model forward over every micro-batch of the step (as the step
    will); it runs here without gradients, statistics or the bias tally, and with the random
    generators restored afterwards (``devices``: CUDA devices to restore too), so the step's
    own forwards route exactly as the pre-pass did. The layers' sums are then summed over the
    data-parallel ranks; inside the block each layer's balance losses are those of the whole
    step (``moekit.losses.global_batch``). ``scale``: micro-batches × data-parallel ranks (the
    averaging the loop applies). Yields how many layers balance over the step.
    """

    layers = [m for m in moe_layers(model) if m.aux_loss.global_batch]
    if not layers:
        yield 0
        return
    for layer in layers:
        layer.balance_tally, layer.global_balance = BalanceTally(), None
    try:
        restored_rng = torch.random.fork_rng(devices=devices or [])
        with restored_rng, torch.no_grad(), without_statistics(model):
            run_pre_pass()
        tallies = [layer.balance_tally for layer in layers]
    finally:
        for layer in layers:
            layer.balance_tally = None
    for layer, tally in zip(layers, tallies, strict=True):
        if tally is not None and tally.counts_E is not None:
            layer.global_balance = tally.finish(layer.dispatcher.global_sum, scale)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.global_balance = None
