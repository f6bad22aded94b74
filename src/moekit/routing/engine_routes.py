"""Routes an inference engine chose while sampling a rollout, aligned with the tokens they
routed, for replay in training (``moekit.replay_routing(model, TokenRoutes)``).

Reinforcement learning on an MoE samples rollouts in an engine (vLLM, SGLang) and computes the
policy gradient in a trainer. Both route each token; small numerical differences flip the
top-k, so the trainer's gradient belongs to another model than the one that sampled (Rollout
Routing Replay, "R3", Ma et al. 2025). Both engines can return the experts of every token:

**vLLM** (``LLM(..., enable_return_routed_experts=True)``): ``CompletionOutput.routed_experts``
is a NumPy integer array ``(num_tokens - 1, num_hidden_layers, num_experts_per_tok)``, where
``num_tokens = len(prompt_token_ids) + len(output.token_ids)``: row ``t`` holds the experts
that routed token ``t`` of the concatenated prompt and completion when it was fed to the model
(prefill for the prompt, one decode step for each generated token). The last generated token is
never fed, so it has no row (prime-rl and verl pad it).

**SGLang** (``--enable-return-routed-experts`` and ``return_routed_experts=True`` per request):
``meta_info["routed_experts"]`` is a base64 string of the row-major bytes of the same
``(prompt + completion - 1, num_hidden_layers, num_experts_per_tok)`` array, ``int32`` unless
``meta_info["routed_experts_dtype"]`` names another (newer servers send ``uint8``/``int16`` when
the ids fit); ``sglang.srt.layers.moe.routed_experts_capturer.
extract_routed_experts_from_meta_info`` returns it flat. Layers without routed experts hold a
placeholder (``-1`` in SGLang-JAX's documentation).

Here both become :class:`TokenRoutes`: ``(B, S, L, K)`` expert ids for a training batch of
``B`` sequences of ``S`` tokens, ``-1`` where the trainer's router should choose live (the last
generated token, padding, a layer without routed experts). ``L`` may be the engine's
``num_hidden_layers`` (the dense layers' rows are ignored) or the model's number of MoE layers.

Replay is keyed by position, not by call order: a router call routes the rows of the micro-batch
the training loop is in (``moekit.utils.randomness.active_rows``; the whole batch outside it),
so activation checkpointing, which runs the forward again in the backward, and any split into
micro-batches take the same routes. The combine weights are recomputed from the live router's
dense scores at the replayed experts, so every replayed expert's weight gets its gradient.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_SGLANG_DTYPES = {
    "int32": np.int32,
    "int16": np.int16,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "int64": np.int64,
}


@dataclass(frozen=True)
class TokenRoutes:
    """Replayed experts per token of a training batch.

    Attributes:
        expert_idx_BSLK: ``(B, S, L, K)`` int64 expert ids; ``-1`` routes that token live.
    """

    expert_idx_BSLK: torch.Tensor

    def __post_init__(self) -> None:
        if self.expert_idx_BSLK.dim() != 4:
            raise ValueError(
                "expert_idx_BSLK must be (batch, seq_len, layers, k), got shape "
                f"{tuple(self.expert_idx_BSLK.shape)}"
            )

    @property
    def num_layers(self) -> int:
        return int(self.expert_idx_BSLK.shape[2])

    @property
    def top_k(self) -> int:
        return int(self.expert_idx_BSLK.shape[3])


def _as_tensor(array: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array)).to(torch.int64)


def routes_from_vllm(routed_experts: Any, num_tokens: int) -> torch.Tensor:
    """One vLLM completion's ``routed_experts`` as ``(num_tokens, L, K)`` int64 routes.

    Args:
        routed_experts: ``CompletionOutput.routed_experts``, ``(num_tokens - 1, L, K)`` (a full
            ``num_tokens`` rows is accepted too).
        num_tokens: ``len(prompt_token_ids) + len(completion token_ids)``: the tokens the
            trainer feeds for this sequence.

    Returns:
        The routes with ``-1`` (route live) for the rows the engine did not route.
    """
    routes = _as_tensor(routed_experts)
    if routes.dim() != 3:
        raise ValueError(
            f"vLLM routed_experts must be (tokens, layers, k), got shape {tuple(routes.shape)}"
        )
    return _pad_tokens(routes, num_tokens, "vLLM routed_experts")


def routes_from_sglang(
    meta_info: Mapping[str, Any], num_tokens: int, *, num_layers: int, top_k: int
) -> torch.Tensor:
    """One SGLang response's ``meta_info["routed_experts"]`` as ``(num_tokens, L, K)`` routes.

    Args:
        meta_info: the response's ``meta_info`` (``routed_experts``: base64 of the row-major
            array; ``routed_experts_dtype``: its dtype, ``int32`` when absent); an already
            decoded flat or shaped array under ``routed_experts`` is accepted too.
        num_tokens: prompt plus completion tokens, as the trainer feeds them.
        num_layers: the engine's layers per row (``num_hidden_layers``).
        top_k: the experts per token (``num_experts_per_tok``).
    """
    payload = meta_info.get("routed_experts")
    if payload is None:
        raise ValueError(
            "meta_info has no 'routed_experts': start SGLang with --enable-return-routed-experts "
            "and send return_routed_experts=True"
        )
    if isinstance(payload, str | bytes):
        dtype_name = meta_info.get("routed_experts_dtype") or "int32"
        if dtype_name not in _SGLANG_DTYPES:
            raise ValueError(
                f"routed_experts_dtype={dtype_name!r}: expected one of {sorted(_SGLANG_DTYPES)}"
            )
        raw = base64.b64decode(payload)
        flat = np.frombuffer(raw, dtype=_SGLANG_DTYPES[dtype_name])
    else:
        flat = np.asarray(payload).reshape(-1)
    per_row = num_layers * top_k
    if flat.size % per_row:
        raise ValueError(
            f"SGLang routed_experts holds {flat.size} ids, not a multiple of num_layers × top_k "
            f"= {num_layers} × {top_k}: wrong num_layers or top_k?"
        )
    routes = _as_tensor(flat.astype(np.int64)).view(-1, num_layers, top_k)
    return _pad_tokens(routes, num_tokens, "SGLang routed_experts")


def _pad_tokens(routes: torch.Tensor, num_tokens: int, what: str) -> torch.Tensor:
    rows = routes.shape[0]
    if rows not in (num_tokens - 1, num_tokens):
        raise ValueError(
            f"{what} has {rows} token rows; a sequence of num_tokens={num_tokens} (prompt + "
            f"completion) has {num_tokens - 1} routed tokens (the last one is never fed)"
        )
    pad = routes.new_full((num_tokens - rows, *routes.shape[1:]), -1)
    return torch.cat([routes, pad])


def batch_routes(sequences: Sequence[torch.Tensor], seq_len: int) -> TokenRoutes:
    """Per-sequence ``(S_i, L, K)`` routes as one right-padded ``(B, seq_len, L, K)`` batch
    (padding routes live); sequences longer than ``seq_len`` are refused, not cut."""
    if not sequences:
        raise ValueError("batch_routes needs at least one sequence")
    shape = tuple(sequences[0].shape[1:])
    out = torch.full(
        (len(sequences), seq_len, *shape), -1, dtype=torch.int64, device=sequences[0].device
    )
    for b, routes in enumerate(sequences):
        if tuple(routes.shape[1:]) != shape:
            raise ValueError(
                f"sequence {b} has (layers, k) = {tuple(routes.shape[1:])}, sequence 0 {shape}"
            )
        if routes.shape[0] > seq_len:
            raise ValueError(f"sequence {b} has {routes.shape[0]} tokens, more than {seq_len}")
        out[b, : routes.shape[0]] = routes
    return TokenRoutes(out)
