"""Multi-head latent attention (MLA; DeepSeek-V2, Liu et al. 2024).

Legend: B = batch, S = new positions, L = cached + new positions, H = heads, D = d_model,
C = kv_lora_rank (latent width), N = no-RoPE head width, R = RoPE head width (shared by all
heads for keys), V = value head width, Q = q_lora_rank.

Queries: ``q_b(norm(q_a(x)))`` (or one projection without ``q_lora_rank``), split per head into
a no-RoPE part and a RoPE part. Keys and values come from a low-rank latent: ``kv_a(x)`` gives a
C-wide latent (normalised) plus one R-wide RoPE key shared by all heads; ``kv_b(latent)`` gives
each head's no-RoPE key and its value. The cache stores only the latent and the RoPE key.
Attention scale ``(N + R)^-0.5``, times ``mscale^2`` under YaRN with ``mscale_all_dim``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.common.attention_base import AttentionMixerConfig
from moekit.models.common.cache import Start, append
from moekit.models.common.masks import allowed_keys
from moekit.models.common.rotary import (
    RopeScalingConfig,
    RotaryConfig,
    apply_rotary,
    yarn_mscale,
)
from moekit.utils.validation import check_fields


@dataclass(kw_only=True)
class MLAConfig(AttentionMixerConfig):
    """Multi-head latent attention (kind ``mla``, a sibling of ``AttentionConfig``; always
    causal).

    Args:
        n_heads: H.
        rope: the rotary positions of the R-wide RoPE part (base and scaling; YaRN's
            ``mscale_all_dim`` also scales the softmax).
        q_lora_rank: query latent width Q (0 for a direct query projection).
        kv_lora_rank: key/value latent width C.
        qk_nope_head_dim: N; qk_rope_head_dim: R; v_head_dim: V.
        rope_interleave: RoPE dimensions stored as interleaved pairs (DeepSeek checkpoints).
    """

    kind: ClassVar[str] = "mla"
    causal: ClassVar[bool] = True

    n_heads: int
    rope: RotaryConfig = field(default_factory=RotaryConfig)
    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_interleave: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "attention.")
        names = ("n_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"attention.{name} must be >= 1, got {getattr(self, name)}")
        if self.q_lora_rank < 0 or self.qk_rope_head_dim % 2:
            raise ValueError(
                "attention.q_lora_rank must be >= 0 and attention.qk_rope_head_dim even"
            )
        if self.rope.partial_factor != 1.0:
            raise ValueError(
                "attention.rope.partial_factor: latent attention rotates its qk_rope_head_dim"
            )

    @property
    def kv_heads(self) -> int:
        return self.n_heads

    def head_width(self, d_model: int) -> int:
        """A query/key head's width: ``N + R``."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def rotary_dim(self, d_model: int) -> int:
        return self.qk_rope_head_dim

    def resolved(self, *, d_model: int) -> MLAConfig:
        return self

    def build(self, *, d_model: int, norm_eps: float = 1e-6) -> MultiHeadLatentAttention:
        """The ``MultiHeadLatentAttention`` on a stream of width ``d_model``, its softmax scale
        adjusted for YaRN scaling (its latent norms keep DeepSeek's 1e-6: ``norm_eps`` is
        unused)."""
        return MultiHeadLatentAttention(
            self,
            d_model=d_model,
            n_heads=self.n_heads,
            softmax_scale=mla_softmax_scale(self, self.rope.scaling),
        )


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """Pairs ``(x0, x1), (x2, x3), ...`` -> ``[x0, x2, ..., x1, x3, ...]`` (rotate-half layout)."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., R/2, 2)
    return torch.cat([pairs.select(-1, 0), pairs.select(-1, 1)], dim=-1)


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA: ``(B, S, D) -> (B, S, D)`` with a latent KV cache."""

    #: the marker presets and LoRA find token mixers by (moekit.models.mixers.base)
    token_mixer: ClassVar[str] = "attention"

    def __init__(
        self,
        config: MLAConfig,
        *,
        d_model: int,
        n_heads: int,
        softmax_scale: float,
        latent_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        c = config
        self.config, self.n_heads, self.softmax_scale = c, n_heads, softmax_scale
        qk_head = c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank:
            self.q_a_proj = nn.Linear(d_model, c.q_lora_rank, bias=False)
            self.q_a_norm = nn.RMSNorm(c.q_lora_rank, eps=latent_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, n_heads * qk_head, bias=False)
            self.q_proj = None
        else:
            self.q_proj = nn.Linear(d_model, n_heads * qk_head, bias=False)
        self.kv_a_proj = nn.Linear(d_model, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_norm = nn.RMSNorm(c.kv_lora_rank, eps=latent_norm_eps)
        self.kv_b_proj = nn.Linear(
            c.kv_lora_rank, n_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(n_heads * c.v_head_dim, d_model, bias=False)

    def cache_shapes(self, batch: int, max_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (batch, 1, max_len, self.config.kv_lora_rank), (
            batch,
            1,
            max_len,
            self.config.qk_rope_head_dim,
        )

    def forward(
        self, x_BSD, rope=None, cache=None, start: Start = 0, key_mask=None
    ) -> torch.Tensor:
        """``(B, S, D) -> (B, S, D)``; arguments as for ``Attention.forward``."""
        c, H = self.config, self.n_heads
        B, S, _ = x_BSD.shape
        q = (
            self.q_proj(x_BSD)
            if self.q_proj is not None
            else self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BSD)))
        )
        q = q.view(B, S, H, -1).transpose(1, 2)
        q_pass, q_rot = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a_proj(x_BSD).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_norm(latent).unsqueeze(1)  # (B, 1, S, C)
        k_rot = k_rot.unsqueeze(1)  # (B, 1, S, R)
        if c.rope_interleave:
            q_rot, k_rot = _deinterleave(q_rot), _deinterleave(k_rot)
        q_rot, k_rot = apply_rotary(q_rot, *rope), apply_rotary(k_rot, *rope)
        if cache is not None:
            latent, k_rot = append(cache, (latent, k_rot), start)
        L = latent.shape[2]
        kv = self.kv_b_proj(latent.squeeze(1)).view(B, L, H, -1).transpose(1, 2)
        k_pass, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k = torch.cat([k_pass, k_rot.expand(-1, H, -1, -1)], dim=-1)
        q = torch.cat([q_pass, q_rot], dim=-1)
        mask, is_causal = None, False
        if key_mask is not None or (S > 1 and L != S) or not isinstance(start, int):
            mask = allowed_keys(S, L, start, causal=True, key_mask_BL=key_mask, device=q.device)
        elif S > 1:
            is_causal = True
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.softmax_scale
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, S, H * c.v_head_dim))


def mla_softmax_scale(config: MLAConfig, rope_scaling: RopeScalingConfig | None) -> float:
    """``(N + R)^-0.5``, times YaRN's ``mscale(factor, mscale_all_dim)^2`` when set."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    if rope_scaling is not None and rope_scaling.mscale_all_dim:
        m = yarn_mscale(rope_scaling.factor, rope_scaling.mscale_all_dim)
        scale = scale * m * m
    return scale
