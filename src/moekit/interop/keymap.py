"""Declarative state-dict key maps between moekit and Hugging Face checkpoints.

A key map is a list of entries with ``{layer}`` (and ``{expert}``) placeholders:

* :class:`Rename`: one tensor under another name (optionally transformed each way);
* :class:`Experts`: one stacked moekit expert tensor ``(E, ...)`` built from per-expert HF
  tensors (``{expert}`` in their names) or from one stacked HF tensor.

``to_moekit`` / ``to_hf`` apply a map to a state dict and raise ``ValueError`` listing every
missing and unexpected key, so a wrong family or layout never loads silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# moekit buffers that hold training-time state, not weights (the bias-balancing load tally)
RUNTIME_BUFFERS = ("load_since_update_E",)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class Rename:
    """One tensor; ``layers`` is ``all``, ``moe`` or ``dense`` (which blocks have it),
    ``none`` (a model-level tensor without ``{layer}``) or a tuple of block indices (a hybrid's
    attention or recurrent blocks)."""

    moekit: str
    hf: str
    to_moekit_fn: Callable[[torch.Tensor], torch.Tensor] = _same
    to_hf_fn: Callable[[torch.Tensor], torch.Tensor] = _same
    layers: str | tuple[int, ...] = "all"


@dataclass(frozen=True)
class Experts:
    """``moekit`` is ``(E, ...)``; ``hf`` names the tensors of expert ``{expert}`` (per-expert
    layout) or, without ``{expert}``, stacked tensors; ``join`` builds the moekit slice (or the
    whole stack) from them and ``split`` inverts it."""

    moekit: str
    hf: tuple[str, ...]
    join: Callable[..., torch.Tensor]
    split: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.hf[0]


@dataclass(frozen=True)
class Joined:
    """One moekit tensor made of several HF tensors (e.g. ``[gate | up]``), outside an expert
    stack; ``layers`` as for :class:`Rename`."""

    moekit: str
    hf: tuple[str, ...]
    join: Callable[..., torch.Tensor]
    split: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    layers: str | tuple[int, ...] = "all"


Entry = Rename | Experts | Joined


def _layers(entry: Entry, n_layers: int, moe_layers: list[int]) -> list[int | None]:
    if not isinstance(entry, Experts) and isinstance(entry.layers, tuple):  # listed blocks
        return list(entry.layers)
    if isinstance(entry, Experts) or entry.layers == "moe":
        return list(moe_layers)
    if entry.layers == "dense":
        return [i for i in range(n_layers) if i not in moe_layers]
    return list(range(n_layers)) if entry.layers == "all" else [None]


def to_moekit(
    hf_state: dict[str, torch.Tensor],
    keymap: list[Entry],
    *,
    n_layers: int,
    moe_layers: list[int],
    num_experts: int,
    sources: dict[str, list[str]] | None = None,
) -> dict[str, torch.Tensor]:
    """Translate an HF state dict; every HF key must be used exactly once. ``sources``, when
    given, is filled with the HF keys each moekit tensor was built from (for error messages)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    taken: list[str] = []

    def take(name: str) -> torch.Tensor | None:
        if name not in hf_state:
            missing.append(name)
            return None
        used.add(name)
        taken.append(name)
        return hf_state[name]

    for entry in keymap:
        for layer in _layers(entry, n_layers, moe_layers):
            fmt = {} if layer is None else {"layer": layer}
            taken = []  # a fresh list: ``take`` appends to whichever list this name holds
            if sources is not None:
                sources[entry.moekit.format(**fmt)] = taken
            if isinstance(entry, Rename):
                tensor = take(entry.hf.format(**fmt))
                if tensor is not None:
                    out[entry.moekit.format(**fmt)] = entry.to_moekit_fn(tensor)
            elif isinstance(entry, Joined) or not entry.per_expert:
                parts = [take(h.format(**fmt)) for h in entry.hf]
                if all(p is not None for p in parts):
                    out[entry.moekit.format(**fmt)] = entry.join(*parts)
            else:
                slices = []
                for e in range(num_experts):
                    parts = [take(h.format(expert=e, **fmt)) for h in entry.hf]
                    if all(p is not None for p in parts):
                        slices.append(entry.join(*parts))
                if len(slices) == num_experts:
                    out[entry.moekit.format(**fmt)] = torch.stack(slices)
    unexpected = sorted(set(hf_state) - used)
    if missing or unexpected:
        raise ValueError(
            "Hugging Face checkpoint does not match the key map: "
            + (f"missing {missing[:20]}{' ...' if len(missing) > 20 else ''}; " if missing else "")
            + (
                f"unexpected {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
                if unexpected
                else ""
            )
        )
    return out


def to_hf(
    state: dict[str, torch.Tensor],
    keymap: list[Entry],
    *,
    n_layers: int,
    moe_layers: list[int],
    num_experts: int,
) -> dict[str, torch.Tensor]:
    """Translate a moekit state dict to HF names (the map's layout); every moekit tensor must
    be written (run-time buffers named in ``runtime_buffers`` excepted)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for entry in keymap:
        for layer in _layers(entry, n_layers, moe_layers):
            fmt = {} if layer is None else {"layer": layer}
            name = entry.moekit.format(**fmt)
            if name not in state:
                missing.append(name)
                continue
            used.add(name)
            tensor = state[name]
            if isinstance(entry, Rename):
                out[entry.hf.format(**fmt)] = entry.to_hf_fn(tensor).contiguous()
            elif isinstance(entry, Joined) or not entry.per_expert:
                for hf_name, part in zip(entry.hf, entry.split(tensor), strict=True):
                    out[hf_name.format(**fmt)] = part.contiguous()
            else:
                for e in range(num_experts):
                    for hf_name, part in zip(entry.hf, entry.split(tensor[e]), strict=True):
                        out[hf_name.format(expert=e, **fmt)] = part.contiguous()
    unmapped = sorted(k for k in set(state) - used if not k.endswith(RUNTIME_BUFFERS))
    if missing or unmapped:
        raise ValueError(
            "the model does not match the family's key map: "
            + (f"missing {missing[:20]}{' ...' if len(missing) > 20 else ''}; " if missing else "")
            + (
                f"tensors the family has no place for {unmapped[:20]}"
                f"{' ...' if len(unmapped) > 20 else ''}"
                if unmapped
                else ""
            )
        )
    return out
