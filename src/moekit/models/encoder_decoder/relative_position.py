"""T5's relative position bias (Raffel et al. 2020, "Exploring the Limits of Transfer Learning
with a Unified Text-to-Text Transformer", section 2.1), as the Switch Transformer uses it.

Legend: H = heads, S = query positions, L = key positions.

Each attention logit gets a learned scalar per head that depends only on the bucketed distance
``key - query``: exact buckets for small distances, logarithmically wider ones up to
``max_distance``, one bucket beyond. Bidirectional (encoder) attention gives half the buckets
to each sign; causal (decoder) attention only looks back and uses every bucket for the past.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """The bucket in ``[0, num_buckets)`` of each ``key - query`` distance (Mesh TensorFlow's
    ``_relative_position_bucket``)."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # the other half of the buckets: log-spaced up to max_distance (log(0) is masked by is_small)
    large = (
        max_exact
        + (
            torch.log(distance.float().clamp(min=1) / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """``(query_len, key_len, start) -> (1, H, S, L)``: the learned per-head bias of each
    query-key pair (queries at positions ``start .. start+S-1``, keys at ``0 .. L-1``).

    Args:
        n_heads: H.
        num_buckets, max_distance: the bucketing (T5: 32 and 128).
        bidirectional: encoder (both directions) or decoder (the past only).
    """

    def __init__(
        self, *, n_heads: int, num_buckets: int, max_distance: int, bidirectional: bool
    ) -> None:
        super().__init__()
        if num_buckets < 2 or max_distance < 1:
            raise ValueError(
                f"relative_attention_buckets must be >= 2 and relative_attention_max_distance "
                f">= 1, got {num_buckets} and {max_distance}"
            )
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.bidirectional = bidirectional
        self.embedding = nn.Embedding(num_buckets, n_heads)

    def forward(self, query_len: int, key_len: int, start: int = 0) -> torch.Tensor:
        device = self.embedding.weight.device
        query_S1 = torch.arange(start, start + query_len, device=device).unsqueeze(1)
        key_1L = torch.arange(key_len, device=device).unsqueeze(0)
        buckets_SL = relative_position_bucket(
            key_1L - query_S1,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self.embedding(buckets_SL).permute(2, 0, 1).unsqueeze(0)
