"""Linear recurrences with a decaying matrix state: the core of Gated DeltaNet and Mamba2 (SSD).

Legend: B = batch, S = positions, H = heads, K = key (state row) width, V = value width,
C = chunk length. Per head, a ``(K, V)`` state ``S`` runs over positions ``t``:

* **gated linear recurrence** (Mamba2's state-space duality, Dao & Gu 2024, arXiv 2405.21060):
  ``S_t = a_t S_{t-1} + k_t v_t^T``;
* **gated delta rule** (Gated DeltaNet, Yang, Kautz & Hatamizadeh 2024, arXiv 2412.06464):
  ``S_t = a_t S_{t-1} + β_t k_t (v_t - a_t S_{t-1}^T k_t)^T``: the state first decays, then
  moves its prediction for ``k_t`` towards ``v_t`` by the step ``β_t``;

with ``a_t = exp(g_t)`` (``g_t ≤ 0``, the log decay) and the output ``o_t = S_t^T q_t``.

Two implementations of each, with the same arguments and results:

* :func:`recurrence_loop`: the definition, one position at a time (the reference; decoding
  uses it for a single new token);
* :func:`recurrence_chunked`: the chunked parallel form for training, a loop over chunks of
  ``C`` positions and matrix products inside each: with ``γ_i = exp(G_i)`` the decay since the
  chunk's start, ``S_0`` the state before it and ``D[i, j] = γ_i / γ_j`` for ``j ≤ i``,

  - delta rule: the chunk's corrected values ``U = T (β V − (β γ K) S_0)`` with
    ``T = (I + L)^{-1}``, ``L[i, j] = β_i D[i, j] (k_i · k_j)`` for ``j < i`` (one triangular
    solve, the "UT transform" of Yang et al.); without the delta rule ``U = V``;
  - ``O = (γ Q) S_0 + (Q K^T ⊙ D) U``, and ``S_C = γ_C S_0 + ((γ_C / γ) K)^T U``.

Packed sequences: ``segment_ids`` ``(B, S)`` restart the state at each segment's first
position (nothing flows between segments), and positions where ``mask`` is ``False`` (padding)
leave the state unchanged. Everything is computed in float32 (float64 for float64 inputs, so
``gradcheck`` applies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def working_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other float dtype."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _prepare(
    g_BSH: torch.Tensor,
    beta_BSH: torch.Tensor | None,
    mask_BS: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Padding leaves the state unchanged: decay 1 (``g = 0``) and no write (``β = 0``)."""
    if mask_BS is None:
        return g_BSH, beta_BSH
    keep = mask_BS.unsqueeze(-1)
    g_BSH = g_BSH.masked_fill(~keep, 0.0)
    if beta_BSH is not None:
        beta_BSH = beta_BSH.masked_fill(~keep, 0.0)
    return g_BSH, beta_BSH


def _starts(segment_ids_BS: torch.Tensor | None, B: int, S: int, device) -> torch.Tensor | None:
    """``(B, S)`` bool: the first position of each segment after the first position."""
    if segment_ids_BS is None:
        return None
    starts = torch.zeros(B, S, dtype=torch.bool, device=device)
    starts[:, 1:] = segment_ids_BS[:, 1:] != segment_ids_BS[:, :-1]
    return starts


def recurrence_loop(
    q_BSHK: torch.Tensor,
    k_BSHK: torch.Tensor,
    v_BSHV: torch.Tensor,
    g_BSH: torch.Tensor,
    beta_BSH: torch.Tensor | None = None,
    *,
    initial_state_BHKV: torch.Tensor | None = None,
    mask_BS: torch.Tensor | None = None,
    segment_ids_BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one position at a time (the reference).

    Args:
        q_BSHK, k_BSHK: queries and keys ``(B, S, H, K)``.
        v_BSHV: values ``(B, S, H, V)``.
        g_BSH: log decays ``(B, S, H)`` (``≤ 0``).
        beta_BSH: the delta rule's steps ``(B, S, H)``, or ``None`` for the plain gated
            recurrence.
        initial_state_BHKV: the state before the first position (zeros when ``None``).
        mask_BS: ``False`` at padding (the state is left unchanged there).
        segment_ids_BS: packed sequences; the state restarts from zero at each new segment.

    Returns:
        ``(B, S, H, V)`` outputs and the final ``(B, H, K, V)`` state (float32).
    """
    B, S, H, K = k_BSHK.shape
    V = v_BSHV.shape[-1]
    g_BSH, beta_BSH = _prepare(g_BSH, beta_BSH, mask_BS)
    starts = _starts(segment_ids_BS, B, S, k_BSHK.device)
    work = working_dtype(v_BSHV)
    q, k, v, g = (t.to(work) for t in (q_BSHK, k_BSHK, v_BSHV, g_BSH))
    state = q.new_zeros(B, H, K, V) if initial_state_BHKV is None else initial_state_BHKV.to(work)
    outputs = []
    for t in range(S):
        decay = g[:, t].exp()[..., None, None]
        if starts is not None:
            decay = decay * (~starts[:, t]).to(work)[:, None, None, None]
        state = state * decay
        if beta_BSH is None:
            update = v[:, t]
        else:
            predicted = torch.einsum("bhkv,bhk->bhv", state, k[:, t])
            update = beta_BSH[:, t].to(work).unsqueeze(-1) * (v[:, t] - predicted)
        state = state + k[:, t].unsqueeze(-1) * update.unsqueeze(-2)
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outputs, dim=1), state


def recurrence_chunked(
    q_BSHK: torch.Tensor,
    k_BSHK: torch.Tensor,
    v_BSHV: torch.Tensor,
    g_BSH: torch.Tensor,
    beta_BSH: torch.Tensor | None = None,
    *,
    initial_state_BHKV: torch.Tensor | None = None,
    mask_BS: torch.Tensor | None = None,
    segment_ids_BS: torch.Tensor | None = None,
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same recurrence in chunks of ``chunk`` positions (matrix products inside a chunk, a
    loop over chunks); arguments and results as for :func:`recurrence_loop`."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    B, S, H, K = k_BSHK.shape
    V = v_BSHV.shape[-1]
    device = k_BSHK.device
    g_BSH, beta_BSH = _prepare(g_BSH, beta_BSH, mask_BS)
    segments = (
        segment_ids_BS
        if segment_ids_BS is not None
        else torch.zeros(B, S, dtype=torch.long, device=device)
    )
    pad = (chunk - S % chunk) % chunk
    N = (S + pad) // chunk

    work = working_dtype(v_BSHV)

    def blocks(t: torch.Tensor) -> torch.Tensor:  # (B, S, H, ...) -> (B, H, N, C, ...)
        t = t.to(work)
        if t.dim() == 3:
            t = F.pad(t, (0, 0, 0, pad))
            return t.reshape(B, N, chunk, H).permute(0, 3, 1, 2)
        t = F.pad(t, (0, 0, 0, 0, 0, pad))
        return t.reshape(B, N, chunk, H, t.shape[-1]).permute(0, 3, 1, 2, 4)

    q, k, v, g = blocks(q_BSHK), blocks(k_BSHK), blocks(v_BSHV), blocks(g_BSH)

    # padded tail positions join the last segment: decay 1 and zero keys/values/steps, so they
    # change nothing
    def pad_last(ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([ids, ids[:, -1:].expand(B, pad)], dim=1).reshape(B, 1, N, chunk)

    seg = pad_last(segments)
    # the segment of position t - 1 (position 0 continues the initial state)
    previous = torch.cat([segments[:, :1], segments[:, :-1]], dim=1)
    seg_before = pad_last(previous)[..., 0]  # (B, 1, N)
    G = g.cumsum(dim=-1)  # (B, H, N, C): log decay since the chunk's start
    same = seg.unsqueeze(-1) == seg.unsqueeze(-2)  # (B, 1, N, C, C)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=device).tril()
    # D[i, j] = γ_i / γ_j for j <= i in the same segment (exponent masked before exp)
    exponent = (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~lower, float("-inf"))
    D = exponent.exp() * same
    carry = (seg == seg_before.unsqueeze(-1)).to(work)  # (B, 1, N, C): sees the incoming state
    gamma = G.exp() * carry  # (B, H, N, C)
    last_seg = seg[..., -1:]  # (B, 1, N, 1)
    to_end = (G[..., -1:] - G).exp() * (seg == last_seg)  # (B, H, N, C): γ_C / γ_j
    gamma_end = G[..., -1].exp() * carry[..., -1]  # (B, H, N)
    if beta_BSH is not None:
        beta = blocks(beta_BSH)
        strictly_lower = torch.ones(chunk, chunk, dtype=torch.bool, device=device).tril(-1)
        strict = D * strictly_lower
        L = beta.unsqueeze(-1) * strict * (k @ k.transpose(-1, -2))
        eye = torch.eye(chunk, device=device, dtype=work)
        rhs_v = beta.unsqueeze(-1) * v
        rhs_k = (beta * gamma).unsqueeze(-1) * k
        solved = torch.linalg.solve_triangular(
            eye + L, torch.cat([rhs_v, rhs_k], dim=-1), upper=False, unitriangular=True
        )
        w_v, w_k = solved[..., :V], solved[..., V:]
    else:
        w_v, w_k = v, None
    state = q.new_zeros(B, H, K, V) if initial_state_BHKV is None else initial_state_BHKV.to(work)
    intra = (q @ k.transpose(-1, -2)) * D  # (B, H, N, C, C)
    outputs = []
    for n in range(N):
        u = w_v[:, :, n] if w_k is None else w_v[:, :, n] - w_k[:, :, n] @ state
        o = (gamma[:, :, n].unsqueeze(-1) * q[:, :, n]) @ state + intra[:, :, n] @ u
        outputs.append(o)
        state = (
            gamma_end[:, :, n, None, None] * state
            + (to_end[:, :, n].unsqueeze(-1) * k[:, :, n]).transpose(-1, -2) @ u
        )
    out = torch.stack(outputs, dim=2).reshape(B, H, N * chunk, V)[:, :, :S]
    return out.transpose(1, 2), state
