"""Random draws that belong to the data, not to the layout: counter-based noise keyed by
``(seed, step, token's place in the global batch, draw site, column)``.

A model's random draws in training (input jitter, noisy top-k gating, GShard's random second
expert, SparseMixer's sampling) come from torch's global generator by default, so they depend
on how many tokens *this call* sees: 4 ranks × 2 rows draw other numbers than one process × 8
rows, and 4 × 2 micro-batches other numbers than one batch of 8. Inside
:func:`token_randomness` (the training loop enters it for every micro-batch, forward and
backward) the same draws are a pure function of the step and of each token's global position
instead, so every split of a global batch into ranks and micro-batches, and every resume, sees
the same noise.

The generator is a 32-bit integer hash (two rounds of xor-shift-multiply, "hash prospector"
constants) evaluated in ``int64`` tensor arithmetic with every product below ``2**63``: no host
sync, any device, and the same bits on every device. Uniforms carry 24 random bits; normals use
Box–Muller on two uniforms.

Outside the context the draws fall back to torch's generator (``torch.rand``/``randn``), as
before, so library users who seed torch see what they always saw.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

_MASK = 0xFFFFFFFF
_MULT = 0x45D9F3B  # < 2**27: a 32-bit value times it stays below 2**59


@dataclass(frozen=True)
class _Keys:
    seed: int
    step: int
    row_offset: int  # first row of this micro-batch in the step's global batch
    rows: int  # rows of this micro-batch
    sites: dict[int, int]  # id(module) -> stable key of its qualified name


_ACTIVE: ContextVar[_Keys | None] = ContextVar("moekit_token_randomness", default=None)


def _mix_int(x: int) -> int:
    for _ in range(2):
        x = ((x ^ (x >> 16)) * _MULT) & _MASK
    return x ^ (x >> 16)


def _mix(x: torch.Tensor) -> torch.Tensor:
    for _ in range(2):
        x = ((x ^ (x >> 16)) * _MULT) & _MASK
    return x ^ (x >> 16)


def _site_key(name: str) -> int:
    # wrappers (activation checkpointing, torch.compile) must not change a module's key
    for fragment in ("_checkpoint_wrapped_module.", "_orig_mod.", "module."):
        name = name.replace(fragment, "")
    return zlib.crc32(name.encode())


@contextlib.contextmanager
def token_randomness(
    model: nn.Module, *, seed: int, step: int, row_offset: int, rows: int
) -> Iterator[None]:
    """Key the random draws of ``model``'s layers by token position while inside.

    Args:
        model: the model whose modules draw (its qualified names key each draw site).
        seed: the run's seed.
        step: the optimizer step (0-based).
        row_offset: index of this micro-batch's first row in the step's global batch.
        rows: rows (sequences) in this micro-batch; each layer's ``T`` tokens are read as
            ``rows × (T / rows)`` in row-major order.
    """
    if rows <= 0 or row_offset < 0:
        raise ValueError(f"rows must be > 0 and row_offset >= 0, got {rows} and {row_offset}")
    sites = {id(m): _site_key(name) for name, m in model.named_modules()}
    token = _ACTIVE.set(_Keys(seed, step, row_offset, rows, sites))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def keyed_randomness_active() -> bool:
    """Whether draws are currently keyed by token position (inside :func:`token_randomness`)."""
    return _ACTIVE.get() is not None


def active_rows() -> tuple[int, int] | None:
    """``(row_offset, rows)`` of the micro-batch inside :func:`token_randomness` (its place in
    the step's global batch), or ``None`` outside it. Replayed engine routes
    (``moekit.routing.engine_routes``) use it to pick a micro-batch's rows."""
    keys = _ACTIVE.get()
    return None if keys is None else (keys.row_offset, keys.rows)


def _draw_site(keys: _Keys, module: nn.Module, name: str) -> int:
    """The hash of (seed, step, the module's place in the model, the draw's name)."""
    site = keys.sites.get(id(module))
    if site is None:
        raise ValueError(
            f"{type(module).__name__} draws randomness but is not part of the model given to "
            "token_randomness()"
        )
    base = _mix_int(_mix_int(_mix_int(keys.seed & _MASK) ^ (keys.step & _MASK)) ^ site)
    return _mix_int(base ^ zlib.crc32(name.encode()))


def _bits(
    module: nn.Module, name: str, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """``shape`` (first dim: tokens) of uniform 32-bit values as int64, keyed by position."""
    keys = _ACTIVE.get()
    assert keys is not None
    T = shape[0]
    if T % keys.rows:
        raise ValueError(
            f"a random draw of {T} tokens cannot be split into the micro-batch's {keys.rows} "
            "rows; keyed randomness needs every layer to see whole rows"
        )
    per_row = T // keys.rows
    base = _draw_site(keys, module, name)
    token_T = torch.arange(T, device=device, dtype=torch.int64) + keys.row_offset * per_row
    columns = math.prod(shape[1:])
    col_C = torch.arange(columns, device=device, dtype=torch.int64)
    h_T = _mix((token_T & _MASK) ^ base)
    h_TC = _mix(h_T.unsqueeze(1) ^ _mix(col_C ^ 0x9E3779B9).unsqueeze(0))
    return h_TC.reshape(shape)


def uniform_like(x: torch.Tensor, module: nn.Module, name: str) -> torch.Tensor:
    """Uniform ``[0, 1)`` noise shaped like ``x`` (first dim: tokens), in ``x``'s dtype:
    keyed by token position inside :func:`token_randomness`, ``torch.rand_like`` outside."""
    if _ACTIVE.get() is None:
        return torch.rand_like(x)
    bits = _bits(module, name, tuple(x.shape), x.device)
    return ((bits >> 8).to(torch.float32) * 2.0**-24).to(x.dtype)


def normal_like(x: torch.Tensor, module: nn.Module, name: str) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` (first dim: tokens): keyed by token position
    inside :func:`token_randomness` (Box–Muller), ``torch.randn_like`` outside."""
    if _ACTIVE.get() is None:
        return torch.randn_like(x)
    shape = tuple(x.shape)
    bits = _bits(module, name, (shape[0], 2, math.prod(shape[1:])), x.device)
    u1 = ((bits[:, 0] >> 8).to(torch.float32) + 0.5) * 2.0**-24  # (0, 1): log is finite
    u2 = (bits[:, 1] >> 8).to(torch.float32) * 2.0**-24
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.reshape(shape).to(x.dtype)


def exponential_like(x: torch.Tensor, module: nn.Module, name: str) -> torch.Tensor:
    """Exponential(1) noise shaped like ``x``: keyed inside :func:`token_randomness`,
    ``torch.empty_like(x).exponential_()`` outside."""
    if _ACTIVE.get() is None:
        return torch.empty_like(x).exponential_()
    bits = _bits(module, name, tuple(x.shape), x.device)
    u = ((bits >> 8).to(torch.float32) + 0.5) * 2.0**-24
    return (-torch.log(u)).to(x.dtype)


def jitter_like(x: torch.Tensor, module: nn.Module, name: str, eps: float) -> torch.Tensor:
    """Multiplicative jitter ``U(1 - eps, 1 + eps)`` shaped like ``x`` (Switch Transformer's
    router input jitter): keyed inside :func:`token_randomness`, torch's generator outside."""
    if _ACTIVE.get() is None:
        return torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
    return 1.0 - eps + 2.0 * eps * uniform_like(x, module, name)


# Expert dropout acts on rows sorted by expert (and, under expert parallelism, moved to another
# rank), so a row's place says nothing about its token. The dispatcher therefore names each row
# by ``global token position × E + expert`` and the bank keys its dropout mask by that name.
_ROW_KEYS: ContextVar[torch.Tensor | None] = ContextVar("moekit_expert_row_keys", default=None)


def expert_row_keys(
    token_idx_M: torch.Tensor, counts_E: torch.Tensor, num_tokens: int
) -> torch.Tensor | None:
    """``(M,)`` int64 names of rows grouped by expert: ``global token position × E + expert``
    (``token_idx_M``: each row's token among this call's ``num_tokens``, ``counts_E``: rows per
    expert); ``None`` outside :func:`token_randomness`."""
    keys = _ACTIVE.get()
    if keys is None:
        return None
    if num_tokens % keys.rows:
        raise ValueError(
            f"{num_tokens} tokens cannot be split into the micro-batch's {keys.rows} rows; "
            "keyed randomness needs every layer to see whole rows"
        )
    E = counts_E.shape[0]
    expert_M = torch.repeat_interleave(
        torch.arange(E, device=counts_E.device), counts_E, output_size=token_idx_M.shape[0]
    )
    first = keys.row_offset * (num_tokens // keys.rows)
    return (token_idx_M.to(torch.int64) + first) * E + expert_M


@contextlib.contextmanager
def rows_named(keys_M: torch.Tensor | None) -> Iterator[None]:
    """While inside, :func:`dropout_rows` keys its mask by ``keys_M`` (one name per row)."""
    token = _ROW_KEYS.set(keys_M)
    try:
        yield
    finally:
        _ROW_KEYS.reset(token)


def dropout_rows(a_MH: torch.Tensor, p: float, module: nn.Module, name: str) -> torch.Tensor:
    """Dropout on ``(M, H)`` rows: keyed by the row names of :func:`rows_named` when training
    draws are keyed (the same mask for a token and expert on any layout), ``F.dropout``
    otherwise."""
    keys_M = _ROW_KEYS.get()
    active = _ACTIVE.get()
    if keys_M is None or active is None or not p:
        return nn.functional.dropout(a_MH, p, training=True)
    if keys_M.shape[0] != a_MH.shape[0]:
        raise ValueError(f"{keys_M.shape[0]} row names for {a_MH.shape[0]} rows")
    base = _draw_site(active, module, name)
    H = a_MH.shape[1]
    col_H = torch.arange(H, device=a_MH.device, dtype=torch.int64)
    h_M = _mix(_mix(keys_M & _MASK) ^ (keys_M >> 32) ^ base)
    u_MH = (_mix(h_M.unsqueeze(1) ^ _mix(col_H ^ 0x9E3779B9).unsqueeze(0)) >> 8).to(
        torch.float32
    ) * 2.0**-24
    keep_MH = u_MH >= p
    return a_MH * keep_MH.to(a_MH.dtype) / (1.0 - p)
