"""Null experts with an elastic number of experts per token (AdaMoE, Zeng et al. 2024;
null experts, arXiv 2601.15370).

A token-choice router that scores ``E`` real experts and ``N`` zero experts (``MoEConfig.
zero_computation.zero``) picks its top-k among all ``E + N``: every slot that lands on a zero
expert costs nothing, so a token uses between 0 and k real experts. This module holds the one
scalar that moves that trade-off, an **offset** added to the zero experts' selection scores
(selection only, like DeepSeek's bias: the combine weights stay the live scores):

- **in training** the offset can steer the average number of real experts per token to a
  target: after each optimizer step ``offset += rate · sign(observed − target)`` over the
  step's tokens (summed over data-parallel ranks by ``moekit.update_null_offsets``), an
  auxiliary-loss-free controller;
- **after training** it is the compute knob: ``moekit.set_compute_budget(model, k, tokens)``
  finds, layer by layer, the offset at which a calibration batch averages ``k`` real experts
  per token, continuously between 0 and the trained k.

Legend: T = tokens, E = experts the router scores (real and special), K = slots per token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class NullSlots(nn.Module):
    """The zero experts' selection offset of one router, and the tally that steers it.

    Args:
        first: the index of the first zero expert (the bank's E).
        count: how many zero experts follow it.
        num_choices: all the experts the router scores.
        target: real experts per token the controller aims at; ``None``: no controller.
        rate: the controller's fixed step.

    Buffers: ``offset`` (0-d), ``tally`` (real assignments, tokens) since the last update.
    """

    offset: torch.Tensor
    tally: torch.Tensor
    mask_E: torch.Tensor

    def __init__(
        self, *, first: int, count: int, num_choices: int, target: float | None, rate: float
    ) -> None:
        super().__init__()
        self.first, self.count = first, count
        self.target, self.rate = target, rate
        self.register_buffer("offset", torch.zeros(()))
        self.register_buffer("tally", torch.zeros(2))
        mask_E = torch.zeros(num_choices)
        mask_E[first : first + count] = 1.0
        self.register_buffer("mask_E", mask_E, persistent=False)
        self._register_load_state_dict_pre_hook(self._zero_if_missing)

    def _zero_if_missing(self, state: dict[str, Any], prefix: str, *_args: Any) -> None:
        """Checkpoints from before the offset existed load with offset 0 (their behaviour)."""
        state.setdefault(prefix + "offset", torch.zeros_like(self.offset))
        state.setdefault(prefix + "tally", torch.zeros_like(self.tally))

    def shift(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Selection scores with the offset added to the zero experts' columns."""
        return scores_TE + (self.offset * self.mask_E).to(scores_TE.dtype)

    @torch.no_grad()
    def record(self, expert_idx_TK: torch.Tensor, token_mask_T: torch.Tensor | None) -> None:
        """Add a training call's real assignments and tokens to the tally (no host sync)."""
        real_TK = expert_idx_TK < self.first
        tokens = torch.full((), real_TK.shape[0], device=real_TK.device, dtype=self.tally.dtype)
        if token_mask_T is not None:
            real_TK = real_TK & token_mask_T.unsqueeze(-1)
            tokens = token_mask_T.sum().to(self.tally.dtype)
        self.tally += torch.stack([real_TK.sum().to(self.tally.dtype), tokens])

    @torch.no_grad()
    def update(self) -> None:
        """One controller step toward ``target`` over the tallied tokens; clears the tally."""
        if self.target is not None:
            real, tokens = self.tally[0], self.tally[1]
            observed = real / tokens.clamp(min=1.0)
            self.offset += self.rate * torch.sign(observed - self.target) * (tokens > 0)
        self.tally.zero_()

    def extra_repr(self) -> str:
        return f"first={self.first}, count={self.count}, target={self.target}, rate={self.rate}"
