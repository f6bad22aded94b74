"""Routing at run time: record the experts every token took, replay them, change k.

Reinforcement-learning fine-tuning of MoE models collapses when the experts chosen while
generating differ from those chosen while training on the same tokens (batch composition,
dtype, kernels); replaying the generation-time routes at training time removes that gap while
the combine weights still come from the live router, so it keeps learning.

    with moekit.record_routing(model) as trace:
        model(tokens)
    trace.save("routes.safetensors")
    with moekit.replay_routing(model, moekit.RoutingTrace.load("routes.safetensors")):
        loss = model(tokens).logits...      # same experts, live weights, router gradients

Routers are matched by their order in the model (``named_modules``), so a trace recorded on a
moekit model replays on the model exported to Hugging Face and imported back, whose module
names are the same, and on any model with the same routers in the same order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from moekit.routing.result import RoutingResult
from moekit.routing.topk import TopKRouter


def _routers(model: nn.Module) -> list[tuple[str, Any]]:
    """Every router of ``model`` (a module with ``num_experts`` and ``top_k`` that returns a
    ``RoutingResult``), in module order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if name.endswith("router") and hasattr(m, "num_experts") and hasattr(m, "top_k")
    ]


@dataclass
class RoutingTrace:
    """Per router (in model order): its name, experts E, and each call's ``(T, K)`` chosen
    experts and combine weights."""

    names: list[str] = field(default_factory=list)
    num_experts: list[int] = field(default_factory=list)
    expert_idx: list[list[torch.Tensor]] = field(default_factory=list)
    weights: list[list[torch.Tensor]] = field(default_factory=list)

    def save(self, path: str | os.PathLike) -> Path:
        """A safetensors file (``{router}.{call}.expert_idx`` / ``.weights``), atomically."""
        from moekit.utils.serialization import atomic_write_bytes

        tensors = {}
        for r, (calls_idx, calls_w) in enumerate(zip(self.expert_idx, self.weights, strict=True)):
            for c, (idx, w) in enumerate(zip(calls_idx, calls_w, strict=True)):
                tensors[f"{r}.{c}.expert_idx"] = idx.contiguous()
                tensors[f"{r}.{c}.weights"] = w.float().contiguous()
        metadata = {"names": json.dumps(self.names), "num_experts": json.dumps(self.num_experts)}
        path = Path(path)
        atomic_write_bytes(path, save(tensors, metadata=metadata))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RoutingTrace:
        from safetensors import safe_open

        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            names, experts = json.loads(metadata["names"]), json.loads(metadata["num_experts"])
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise ValueError(f"{path} is not a routing trace: {e}") from None
        trace = cls(names=names, num_experts=experts)
        for r in range(len(names)):
            calls = sorted({int(k.split(".")[1]) for k in tensors if k.startswith(f"{r}.")})
            trace.expert_idx.append([tensors[f"{r}.{c}.expert_idx"] for c in calls])
            trace.weights.append([tensors[f"{r}.{c}.weights"] for c in calls])
        return trace

    def experts_of(self, router: int, call: int = 0) -> torch.Tensor:
        return self.expert_idx[router][call]


@contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingTrace]:
    """Record every router call inside the ``with`` block (on the CPU, detached)."""
    routers = _routers(model)
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
def replay_routing(model: nn.Module, trace: RoutingTrace) -> Iterator[None]:
    """Inside the block, every token-choice top-k router takes the trace's experts, call by
    call in recorded order; combine weights come from the live router (gradients flow)."""
    routers = _routers(model)
    if [int(m.num_experts) for _, m in routers] != trace.num_experts:
        raise ValueError(
            f"the trace was recorded on routers with {trace.num_experts} experts; this model's "
            f"have {[int(m.num_experts) for _, m in routers]} (a trace from another model?)"
        )
    topk: list[tuple[str, TopKRouter]] = []
    for name, router in routers:
        if not isinstance(router, TopKRouter):
            raise ValueError(
                f"{name} is a {type(router).__name__}; replay needs token-choice top-k routers"
            )
        topk.append((name, router))
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


def set_top_k(model: nn.Module, k: int) -> int:
    """Route every token to ``k`` experts in every token-choice top-k router from now on (the
    weights are renormalised the way each router was trained: renormalised top-k stays
    renormalised, softmax-after-top-k re-softmaxes over the k). Returns how many routers
    changed. Raises for k outside ``[1, E]`` or beyond what group-limited routing allows."""
    routers = [(n, m) for n, m in _routers(model) if isinstance(m, TopKRouter)]
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
