"""The selective scan of the first Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling
with Selective State Spaces", arXiv 2312.00752): a diagonal state-space recurrence whose decay
is per channel *and* per state element (Mamba2's is one scalar per head, which
:mod:`moekit.models.mixers.recurrence` covers).

Legend: B = batch, S = positions, D = channels (the mixer's inner width), N = state width,
L = chunk length, M = chunks.

Per channel ``d`` and state element ``n``:
``h_t[d, n] = exp(Δ_t[d] A[d, n]) h_{t-1}[d, n] + Δ_t[d] u_t[d] B_t[n]``,
``y_t[d] = Σ_n C_t[n] h_t[d, n]`` (the ``D`` skip and the gate are the mixer's).

Two implementations, with the same arguments and results:

* :func:`selective_scan_loop`: the definition, one position at a time (the reference; decoding
  uses it for a single new token);
* :func:`selective_scan_chunked`: the two-level scan for training. The sequence is cut into
  ``M`` chunks of ``L`` positions; one loop over the ``L`` positions of a chunk runs *every
  chunk at once* from a zero state, giving each position's local state and its decay since the
  chunk's start; one loop over the ``M`` chunks carries the true state across chunk borders;
  each position then adds ``Σ_n C_t[n] exp(G_t[d, n]) H_chunk[d, n]`` for the state it
  inherited. ``L + M`` Python steps instead of ``S`` (``L ≈ √S`` is the least), every
  exponent ``≤ 0`` (no overflow, unlike a log-space cumulative sum), memory ``O(B S D N)`` as
  the loop's saved states.

Padding (``mask`` ``False``) leaves the state unchanged (``Δ = 0``: decay 1, nothing
written); ``segment_ids`` restart the state at each segment's first position. Computed in
float32 (float64 for float64 inputs, so ``gradcheck`` applies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.models.mixers.recurrence import working_dtype


def _prepare(
    dt_BSD: torch.Tensor, mask_BS: torch.Tensor | None, segment_ids_BS: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``Δ`` zeroed at padding, and the ``(B, S)`` segment starts (``None`` without segments)."""
    if mask_BS is not None:
        dt_BSD = dt_BSD.masked_fill(~mask_BS.unsqueeze(-1), 0.0)
    if segment_ids_BS is None:
        return dt_BSD, None
    starts = torch.zeros_like(segment_ids_BS, dtype=torch.bool)
    starts[:, 1:] = segment_ids_BS[:, 1:] != segment_ids_BS[:, :-1]
    return dt_BSD, starts


def selective_scan_loop(
    u_BSD: torch.Tensor,
    dt_BSD: torch.Tensor,
    A_DN: torch.Tensor,
    B_BSN: torch.Tensor,
    C_BSN: torch.Tensor,
    *,
    initial_state_BDN: torch.Tensor | None = None,
    mask_BS: torch.Tensor | None = None,
    segment_ids_BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan one position at a time (the reference).

    Args:
        u_BSD: inputs ``(B, S, D)``.
        dt_BSD: time steps ``Δ`` ``(B, S, D)`` (after softplus, ``≥ 0``).
        A_DN: ``(D, N)`` state matrix diagonal (``≤ 0``: ``-exp(A_log)``).
        B_BSN, C_BSN: input and output projections ``(B, S, N)``.
        initial_state_BDN: the state before the first position (zeros when ``None``).
        mask_BS: ``False`` at padding (the state is left unchanged there).
        segment_ids_BS: packed sequences; the state restarts from zero at each new segment.

    Returns:
        ``(B, S, D)`` outputs and the final ``(B, D, N)`` state (float32).
    """
    Bz, S, D = u_BSD.shape
    N = A_DN.shape[1]
    dt_BSD, starts = _prepare(dt_BSD, mask_BS, segment_ids_BS)
    work = working_dtype(u_BSD)
    u, dt, A, b, c = (t.to(work) for t in (u_BSD, dt_BSD, A_DN, B_BSN, C_BSN))
    state = u.new_zeros(Bz, D, N) if initial_state_BDN is None else initial_state_BDN.to(work)
    outputs = []
    for t in range(S):
        decay = torch.exp(dt[:, t, :, None] * A)
        if starts is not None:
            decay = decay * (~starts[:, t]).to(work)[:, None, None]
        state = decay * state + (dt[:, t] * u[:, t])[:, :, None] * b[:, t, None, :]
        outputs.append((state * c[:, t, None, :]).sum(-1))
    return torch.stack(outputs, dim=1), state


def selective_scan_chunked(
    u_BSD: torch.Tensor,
    dt_BSD: torch.Tensor,
    A_DN: torch.Tensor,
    B_BSN: torch.Tensor,
    C_BSN: torch.Tensor,
    *,
    initial_state_BDN: torch.Tensor | None = None,
    mask_BS: torch.Tensor | None = None,
    segment_ids_BS: torch.Tensor | None = None,
    chunk: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-level scan (see the module docstring); arguments and results as for
    :func:`selective_scan_loop`, plus ``chunk`` (``L``, positions per chunk)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    Bz, S, D = u_BSD.shape
    N = A_DN.shape[1]
    dt_BSD, starts_BS = _prepare(dt_BSD, mask_BS, segment_ids_BS)
    work = working_dtype(u_BSD)
    L = min(chunk, S)
    pad = (L - S % L) % L
    M = (S + pad) // L

    def chunks(t: torch.Tensor) -> torch.Tensor:  # (B, S, X) -> (B, M, L, X), zero padded
        return F.pad(t.to(work), (0, 0, 0, pad)).reshape(Bz, M, L, t.shape[-1])

    u, dt, b, c = chunks(u_BSD), chunks(dt_BSD), chunks(B_BSN), chunks(C_BSN)
    A = A_DN.to(work)
    if starts_BS is None:
        starts = torch.zeros(Bz, M, L, dtype=torch.bool, device=u.device)
    else:
        starts = F.pad(starts_BS, (0, pad)).reshape(Bz, M, L)
    written = dt * u  # (B, M, L, D)
    local = u.new_zeros(Bz, M, D, N)  # each chunk's state from zero
    log_decay = u.new_zeros(Bz, M, D, N)  # G_t: log decay since the chunk's start
    inherits = torch.ones(Bz, M, dtype=torch.bool, device=u.device)  # no segment start yet
    local_outputs, inherited_reads = [], []
    for t in range(L):  # every chunk at once
        step = dt[:, :, t, :, None] * A  # (B, M, D, N)
        keep = (~starts[:, :, t]).to(work)[..., None, None]
        local = local * torch.exp(step) * keep + written[:, :, t, :, None] * b[:, :, t, None, :]
        log_decay = log_decay + step
        inherits = inherits & ~starts[:, :, t]
        local_outputs.append((local * c[:, :, t, None, :]).sum(-1))
        carried = torch.exp(log_decay) * inherits.to(work)[..., None, None]
        inherited_reads.append(carried * c[:, :, t, None, :])
    end_decay = carried  # (B, M, D, N): what the incoming state keeps at the chunk's end
    state = u.new_zeros(Bz, D, N) if initial_state_BDN is None else initial_state_BDN.to(work)
    incoming = []
    for m in range(M):
        incoming.append(state)
        state = end_decay[:, m] * state + local[:, m]
    incoming_BMDN = torch.stack(incoming, dim=1)
    y = torch.stack(local_outputs, dim=2) + torch.einsum(
        "bmldn,bmdn->bmld", torch.stack(inherited_reads, dim=2), incoming_BMDN
    )
    return y.reshape(Bz, M * L, D)[:, :S], state
