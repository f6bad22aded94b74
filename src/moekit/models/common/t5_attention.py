"""T5 attention: self-attention with an additive relative position bias, and the decoder's
attention over the encoder output (cross-attention).

Legend: B = batch, S = query positions, L = key positions, H = heads, Dh = head width,
D = d_model.

As in T5 and the Switch Transformer, the logits are not divided by ``sqrt(Dh)`` (the scale is
folded into the initialisation) and the projections have no biases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.common.attention_base import AttentionMixerConfig
from moekit.utils.validation import check_fields


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``allowed``, the dtype's most negative value elsewhere (as T5 does: a row with
    no allowed key then averages its values instead of giving NaN)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


@dataclass(kw_only=True)
class T5AttentionConfig(AttentionMixerConfig):
    """T5's attention (kind ``t5``, a sibling of ``AttentionConfig``): no scaling, no biases,
    positions from an additive relative position bias the stack computes once and passes to
    every block (``moekit.models.encoder_decoder.relative_position``); the encoder–decoder's
    self- and cross-attention.

    Args:
        n_heads: H.
        head_dim: Dh (``d_kv`` in T5 configs; H * Dh need not equal D).
        causal: the decoder's self-attention (the mask is in the bias the stack passes).
    """

    kind: ClassVar[str] = "t5"
    rope: ClassVar[None] = None  # positions come from the relative position bias

    n_heads: int
    head_dim: int
    causal: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "attention.")
        if self.n_heads < 1 or self.head_dim < 1:
            raise ValueError(
                f"attention.n_heads and attention.head_dim must be >= 1, got {self.n_heads} "
                f"and {self.head_dim}"
            )

    @property
    def kv_heads(self) -> int:
        return self.n_heads

    def head_width(self, d_model: int) -> int:
        return self.head_dim

    def rotary_dim(self, d_model: int) -> int:
        return 0

    def resolved(self, *, d_model: int) -> T5AttentionConfig:
        return self

    def build(self, *, d_model: int, norm_eps: float = 1e-6) -> T5Attention:
        """The ``T5Attention`` on a stream of width ``d_model`` (it has no norm: ``norm_eps``
        is unused)."""
        return T5Attention(d_model=d_model, n_heads=self.n_heads, head_dim=self.head_dim)


class T5Attention(nn.Module):
    """Multi-head attention without scaling or biases; ``(B, S, D) -> (B, S, D)``.

    Args:
        d_model: D.
        n_heads: H.
        head_dim: Dh (``d_kv`` in T5 configs; H * Dh need not equal D).
    """

    #: the marker presets and LoRA find token mixers by (moekit.models.mixers.base)
    token_mixer: ClassVar[str] = "attention"

    def __init__(self, *, d_model: int, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        inner = n_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, d_model, bias=False)

    def _heads(self, x_BLX: torch.Tensor) -> torch.Tensor:
        B, L, _ = x_BLX.shape
        return x_BLX.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, memory_BLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, H, L, Dh)`` keys and values of ``memory`` (the encoder output, computed once
        per generation)."""
        return self._heads(self.k_proj(memory_BLD)), self._heads(self.v_proj(memory_BLD))

    def forward(
        self,
        x_BSD: torch.Tensor,
        bias: torch.Tensor,
        *,
        keys_values: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Args:
        x_BSD: the queries' stream (and, without ``keys_values``, the keys').
        bias: ``(1 or B, H or 1, S, L)`` added to the logits: position bias plus mask.
        keys_values: precomputed keys and values (cross-attention).
        cache: this layer's ``(keys, values)`` buffers ``(B, H, max_len, Dh)``; the new keys
            and values are written at ``start`` and the queries see ``0 .. start+S-1``.
        start: position of the first query.
        """
        B, S, _ = x_BSD.shape
        q = self._heads(self.q_proj(x_BSD))
        if keys_values is not None:
            k, v = keys_values
        else:
            k, v = self._heads(self.k_proj(x_BSD)), self._heads(self.v_proj(x_BSD))
            if cache is not None:
                keys, values = cache
                positions = torch.arange(start, start + S, device=keys.device)
                keys.index_copy_(2, positions, k.to(keys.dtype))
                values.index_copy_(2, positions, v.to(values.dtype))
                k = keys.narrow(2, 0, start + S).to(q.dtype)
                v = values.narrow(2, 0, start + S).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))
