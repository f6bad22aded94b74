"""A record of the experts every router chose, call by call: saved and loaded as safetensors.

``moekit.record_routing`` fills one and ``moekit.replay_routing`` replays it
(``moekit.layers.switches``). Routers are matched by their order in the model, so a trace
recorded on a moekit model replays on the model exported to Hugging Face and imported back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from moekit.utils.serialization import atomic_write_bytes


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
        """The ``(T, K)`` experts router ``router`` chose in its call ``call``."""
        return self.expert_idx[router][call]
