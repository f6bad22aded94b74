"""Causal (or bidirectional) self-attention with rotary positions, grouped-query heads and a
key/value cache.

Legend: B = batch, S = new positions, L = cached + new positions, H = query heads,
G = key/value heads (H % G == 0), Dh = head dim, D = d_model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from moekit.utils.validation import check_fields


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term ``0.1 * mscale * ln(factor) + 1`` (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(head_dim: int, theta: float, scaling) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones, ramp in between."""
    dim = head_dim
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (scaling.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return (
            dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi))
        ) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    if scaling.attention_factor is not None:
        factor = scaling.attention_factor
    elif scaling.mscale and scaling.mscale_all_dim:
        factor = yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(
            scaling.factor, scaling.mscale_all_dim
        )
    else:
        factor = yarn_mscale(scaling.factor)
    return inv_freq, factor


@dataclass(kw_only=True)
class RopeScalingConfig:
    """YaRN rotary scaling (Peng et al. 2023), as DeepSeek-V3 and GPT-OSS use it.

    Args:
        factor: context extension factor.
        original_max_position_embeddings: the pre-extension context.
        beta_fast, beta_slow: rotation counts bounding the interpolation ramp.
        mscale, mscale_all_dim: DeepSeek's attention-temperature terms (0 = unused).
        attention_factor: explicit cos/sin scale (``None``: derived from the above).
        truncate: round the ramp bounds to whole dimensions.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        check_fields(self)
        if self.factor <= 0 or self.original_max_position_embeddings < 1:
            raise ValueError(
                "rope_scaling.factor must be > 0 and original_max_position_embeddings >= 1"
            )


def rotary_tables(
    head_dim: int, max_positions: int, theta: float, scaling=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` of shape ``(max_positions, head_dim)`` for rotate-half RoPE (Su et al.),
    optionally YaRN-scaled (``scaling``: a ``RopeScalingConfig``)."""
    if scaling is None:
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        attention_factor = 1.0
    else:
        inv_freq, attention_factor = _yarn_inv_freq(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rotary(x_BHSD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    first, second = x_BHSD.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x_BHSD * cos_SD.to(x_BHSD.dtype) + rotated * sin_SD.to(x_BHSD.dtype)


class QKNorm(str, Enum):
    """RMSNorm on queries and keys before RoPE."""

    NONE = "none"
    HEAD = "head"  # per head (Qwen3)
    FULL = "full"  # over the whole projection (OLMoE)


def allowed_keys(
    S: int,
    L: int,
    start: int,
    *,
    causal: bool,
    window: int = 0,
    key_mask_BL: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Which keys each query may attend to: ``(S, L)``, or ``(B, 1, S, L)`` with a key mask.

    Queries are positions ``start .. start+S-1`` of the ``L`` keys; ``window`` keeps the last
    ``window`` keys of each query (0: all); ``key_mask_BL`` (``True`` = real token) hides
    padding keys, or, shaped ``(B, 1, S, L)``, says per query which keys it may see (packed
    segments). A padding query may then see no key at all, which would make its softmax NaN:
    it is allowed to see itself instead (no real query ever sees a padding key, so real
    outputs are unchanged).
    """
    query_S1 = torch.arange(start, start + S, device=device).unsqueeze(1)
    key_1L = torch.arange(L, device=device).unsqueeze(0)
    allowed = key_1L <= query_S1 if causal else torch.ones(S, L, dtype=torch.bool, device=device)
    if window:
        allowed = allowed & (key_1L > query_S1 - window)
    if key_mask_BL is not None:
        B = key_mask_BL.shape[0]
        # (B, L): padding keys; (B, 1, S, L): any per-query mask (packed sequences' segments)
        keys = key_mask_BL if key_mask_BL.dim() == 4 else key_mask_BL.view(B, 1, 1, L)
        allowed = (allowed & keys) | (key_1L == query_S1)
    return allowed


@dataclass
class KVCache:
    """Keys and values of every layer for generation: ``(B, G, max_len, Dh)`` per layer.

    ``length`` counts the positions already written; the model advances it after each call.
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0
    # (B, max_len) bool, which cached positions are real tokens (None: all of them)
    key_mask: torch.Tensor | None = None

    @classmethod
    def empty(
        cls,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        shape = (batch, n_kv_heads, max_len, head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)],
        )

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @classmethod
    def for_layers(
        cls, shapes: list[tuple[tuple[int, ...], tuple[int, ...]]], dtype, device
    ) -> KVCache:
        """A cache with per-layer ``(key shape, value shape)``; positions on dim 2."""
        return cls(
            keys=[torch.zeros(k, dtype=dtype, device=device) for k, _ in shapes],
            values=[torch.zeros(v, dtype=dtype, device=device) for _, v in shapes],
        )


@dataclass(kw_only=True)
class AttentionConfig:
    """One block's grouped-query self-attention.

    Args:
        n_heads: query heads. n_kv_heads: key/value heads (``n_heads`` is a multiple of it).
        head_dim: width of each head.
        causal: each position sees only earlier ones. rotary: rotary positions (RoPE).
        qkv_bias, o_bias: biases in the projections. qk_norm: RMSNorm of queries and keys
            (``none``, ``head``: per head, Qwen3; ``full``: over the projection, OLMoE).
        norm_eps: the norms' epsilon. sinks: a learned per-head attention sink (GPT-OSS).
        sliding_window: attend to this many positions at most (0: every earlier one).
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    causal: bool = True
    rotary: bool = True
    qkv_bias: bool = False
    qk_norm: QKNorm = QKNorm.NONE
    norm_eps: float = 1e-6
    o_bias: bool = False
    sinks: bool = False
    sliding_window: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )

    def build(self, *, d_model: int) -> Attention:
        """The ``Attention`` of this config on a stream of width ``d_model``."""
        return Attention(self, d_model=d_model)


class Attention(nn.Module):
    """Multi-head self-attention with RoPE and grouped-query heads, via
    ``torch.nn.functional.scaled_dot_product_attention``; ``(B, S, D) -> (B, S, D)``."""

    def __init__(self, config: AttentionConfig, *, d_model: int) -> None:
        super().__init__()
        n_heads, n_kv_heads, head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        qkv_bias, o_bias, norm_eps = config.qkv_bias, config.o_bias, config.norm_eps
        sinks, sliding_window, qk_norm = config.sinks, config.sliding_window, config.qk_norm
        self.config = config
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.causal, self.rotary = config.causal, config.rotary
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=o_bias)
        # GPT-OSS: a learned per-head logit that joins every softmax and takes some of its mass
        self.sinks = nn.Parameter(torch.zeros(n_heads)) if sinks else None
        self.sliding_window = sliding_window  # 0: attend to every earlier position
        # RMSNorm on queries and keys before RoPE: per head (Qwen3) or over the whole
        # projection (OLMoE)
        self.qk_norm = qk_norm = QKNorm(qk_norm)
        self.q_norm = self.k_norm = None
        if qk_norm is QKNorm.HEAD:
            self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps)
            self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps)
        elif qk_norm is QKNorm.FULL:
            self.q_norm = nn.RMSNorm(n_heads * head_dim, eps=norm_eps)
            self.k_norm = nn.RMSNorm(n_kv_heads * head_dim, eps=norm_eps)
        elif qk_norm != "none":
            raise ValueError(f"qk_norm must be 'none', 'head' or 'full', got {qk_norm!r}")

    def cache_shapes(self, batch: int, max_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        shape = (batch, self.n_kv_heads, max_len, self.head_dim)
        return shape, shape

    def _masked_attention(self, q, k, v, allowed: torch.Tensor) -> torch.Tensor:
        """Explicit softmax attention for attention sinks (``(B, H, S, Dh)`` out)."""
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(2, 3)) * self.head_dim**-0.5
        scores = torch.where(allowed, scores, float("-inf"))
        if self.sinks is not None:
            sink = self.sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
            L = scores.shape[-1]
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1).narrow(-1, 0, L)
        else:
            probs = torch.softmax(scores, dim=-1)
        return probs @ v

    def forward(
        self,
        x_BSD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
        x_BSD: ``(B, S, D)`` new positions ``start .. start+S-1``.
        rope: ``(cos, sin)`` tables covering those positions, ``(S, Dh)`` each, or
            ``(B, 1, S, Dh)`` when each sequence has its own positions (padding).
        cache: this layer's ``(keys, values)`` buffers ``(B, G, max_len, Dh)``; the new keys
            and values are written at ``start`` and attention covers ``0 .. start+S-1``.
        start: position of the first new token.
        key_mask: ``(B, start+S)`` bool, ``True`` for real tokens; padding keys are hidden.
        """
        B, S, _ = x_BSD.shape
        q, k = self.q_proj(x_BSD), self.k_proj(x_BSD)
        if self.q_norm is not None and self.k_norm is not None and self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim)
        k = k.view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None and self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary and rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            keys, values = cache
            positions = torch.arange(start, start + S, device=keys.device)
            keys.index_copy_(2, positions, k.to(keys.dtype))
            values.index_copy_(2, positions, v.to(values.dtype))
            k, v = keys.narrow(2, 0, start + S), values.narrow(2, 0, start + S)
            # a cache kept in another dtype than the queries (new_kv_cache(dtype=...))
            k, v = k.to(q.dtype), v.to(q.dtype)
        L = k.shape[2]
        if key_mask is None and not self.sliding_window:
            mask, is_causal = None, False
            if self.causal and S > 1:
                if L == S:
                    is_causal = True
                else:  # new queries after cached positions: query i sees keys <= start + i
                    mask = allowed_keys(S, L, start, causal=True, device=x_BSD.device)
        else:
            mask, is_causal = (
                allowed_keys(
                    S,
                    L,
                    start,
                    causal=self.causal,
                    window=self.sliding_window,
                    key_mask_BL=key_mask,
                    device=x_BSD.device,
                ),
                False,
            )
        if self.sinks is not None:
            if mask is None:
                mask = allowed_keys(S, L, start, causal=self.causal, device=x_BSD.device)
            out = self._masked_attention(q, k, v, mask)
        else:
            grouped = self.n_kv_heads != self.n_heads
            if grouped and mask is not None and q.device.type == "cuda":
                # CUDA's fused kernels take GQA only without a mask: repeat the key/value heads
                # (a copy, far smaller than the math kernel's B*H*S*L scores)
                groups = self.n_heads // self.n_kv_heads
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
                grouped = False
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=grouped
            )
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))
