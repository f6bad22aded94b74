"""Causal (or bidirectional) self-attention with rotary positions, grouped-query heads and a
key/value cache.

Legend: B = batch, S = new positions, L = cached + new positions, H = query heads,
G = key/value heads (H % G == 0), Dh = head dim, D = d_model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.common.attention_base import SOFTMAX_KIND, AttentionMixerConfig
from moekit.models.common.cache import Start, append, new_positions
from moekit.models.common.masks import allowed_keys
from moekit.models.common.rotary import RotaryConfig, apply_rotary
from moekit.utils.validation import check_fields


class QKNorm(str, Enum):
    """RMSNorm on queries and keys before RoPE."""

    NONE = "none"
    HEAD = "head"  # per head (Qwen3)
    FULL = "full"  # over the whole projection (OLMoE)
    HEAD_AFTER_ROPE = "head_after_rope"  # per head, after the rotation (Hunyuan-MoE)
    # per head after the rotation, without a learned weight, on rotary layers only (Llama 4)
    WEIGHTLESS = "weightless"


class ValueSource(str, Enum):
    """Where attention's values come from (``AttentionConfig.values``)."""

    PROJECTED = "projected"
    NORMED = "normed"
    KEYS = "keys"


@dataclass
class KVCache:
    """Every layer's decoding state: keys and values ``(B, G, max_len, Dh)`` of an attention
    layer, or the convolution and recurrent states of a recurrent token mixer (Gated DeltaNet,
    Mamba2, short convolution: ``keys[i]`` and ``values[i]`` hold them, fixed-size).

    ``length`` counts the positions already written; the model advances it after each call.
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0
    # (B, max_len) bool, which cached positions are real tokens (None: all of them)
    key_mask: torch.Tensor | None = None
    capacity: int = 0  # max_len when the first layer's state does not show it (0: it does)
    # fixed-shape decoding: the next slot to write, a 0-dim long tensor on the device (None:
    # ``length`` on the host; ``TransformerLM.new_kv_cache(..., fixed_shapes=True)``)
    slot: torch.Tensor | None = None

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
        if self.capacity:
            return self.capacity
        return self.keys[0].shape[2] if self.keys else 0

    @classmethod
    def for_layers(
        cls,
        shapes: list[tuple[Any, ...]],
        dtype,
        device,
        max_len: int = 0,
    ) -> KVCache:
        """A cache with per-layer ``(key shape, value shape)`` (positions on dim 2), or a
        recurrent mixer's ``(conv state shape, recurrent state shape, "float32")`` (its
        recurrent state is kept in float32 whatever ``dtype``)."""
        keys, values = [], []
        for entry in shapes:
            value_dtype = torch.float32 if len(entry) == 3 else dtype
            keys.append(torch.zeros(entry[0], dtype=dtype, device=device))
            values.append(torch.zeros(entry[1], dtype=value_dtype, device=device))
        return cls(keys=keys, values=values, capacity=max_len)


@dataclass(kw_only=True)
class QueryTemperatureConfig:
    """Queries scaled by ``1 + scale * log(1 + floor((position + 1) / floor_scale))`` (Llama 4's
    attention temperature tuning on its NoPE blocks, arXiv:2501.19399).

    Args:
        floor_scale: positions per step of the temperature (Llama 4: 8192).
        scale: the log term's weight.
    """

    floor_scale: int
    scale: float = 0.1

    def __post_init__(self) -> None:
        check_fields(self, "attention.query_temperature.")
        if self.floor_scale < 1:
            raise ValueError(
                f"attention.query_temperature.floor_scale must be >= 1, got {self.floor_scale}"
            )


@dataclass(kw_only=True)
class AttentionConfig(AttentionMixerConfig):
    """Softmax self-attention: grouped-query heads with rotary positions, optional biases,
    query/key norms, an output gate, a sliding window or chunks and attention sinks. Its
    siblings are latent attention (``MLAConfig``, kind ``mla``) and a mixture of attention
    heads (``MoAConfig``, kind ``moa``); a layer pattern (``TokenMixerLayout``) gives blocks
    their own attention config (GPT-OSS's windowed layers, Llama 4's NoPE layers).

    Args:
        n_heads: query heads.
        n_kv_heads: key/value heads (grouped-query attention; ``n_heads`` is a multiple of it);
            ``None`` means ``n_heads``.
        head_dim: width of each head; ``None`` means ``d_model // n_heads``.
        causal: each position sees only earlier ones.
        rope: rotary positions on queries and keys (``RotaryConfig``: base, scaling, the
            rotated share of each head); ``None``: no positions (NoPE).
        qkv_bias: biases on the query, key and value projections (Qwen2).
        qk_norm: RMSNorm of queries and keys: ``none``, ``head`` (per head before RoPE, Qwen3),
            ``full`` (over the whole projection, OLMoE) or ``head_after_rope`` (per head after
            the rotation, Hunyuan-MoE) or ``weightless`` (per head after the rotation, no
            learned weight: Llama 4's rotary layers). Its epsilon is the model's ``norm_eps``.
        o_bias: a bias on the output projection (GPT-OSS).
        sinks: a learned per-head sink logit in every softmax (GPT-OSS).
        output_gate: each head's output is multiplied by ``sigmoid`` of a gate the query
            projection also computes (Qwen3-Next, Qwen3.5: ``q_proj`` gives ``[query | gate]``
            per head).
        values: ``projected`` (``v_proj``), ``normed`` (``v_proj`` then an RMSNorm without
            weight per head, Gemma 4) or ``keys`` (no ``v_proj``: the key projection's output,
            RMS-normed without weight, is the value; Gemma 4's global layers).
        sliding_window: attend to this many positions at most (0: every earlier one).
        chunk_size: attend only within chunks of this many positions (Llama 4's local
            attention); 0: off.
        query_temperature: position-dependent query scaling (Llama 4's NoPE blocks), or
            ``None``.
        scale: the logits' scale; ``None`` means ``head_dim ** -0.5`` (Granite sets its own
            ``attention_multiplier``).
    """

    kind: ClassVar[str] = SOFTMAX_KIND

    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    causal: bool = True
    rope: RotaryConfig | None = field(default_factory=RotaryConfig)
    qkv_bias: bool = False
    qk_norm: QKNorm = QKNorm.NONE
    o_bias: bool = False
    sinks: bool = False
    output_gate: bool = False
    values: ValueSource = ValueSource.PROJECTED
    sliding_window: int = 0
    chunk_size: int = 0
    query_temperature: QueryTemperatureConfig | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        check_fields(self, "attention.")
        if self.chunk_size < 0 or self.sliding_window < 0:
            raise ValueError(
                f"attention.chunk_size and attention.sliding_window must be >= 0, got "
                f"{self.chunk_size} and {self.sliding_window}"
            )
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"attention.scale must be > 0 (or None), got {self.scale}")
        if self.n_heads < 1:
            raise ValueError(f"attention.n_heads must be >= 1, got {self.n_heads}")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ValueError(
                f"attention.n_heads={self.n_heads} must be a multiple of "
                f"attention.n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"attention.head_dim must be >= 1, got {self.head_dim}")
        if self.head_dim is not None and self.rope is not None:
            self.check_rotated(self.head_dim)

    def check_rotated(self, head_dim: int) -> None:
        """Refuse a rotated part of each head that is odd or narrower than 2."""
        if self.rope is None:
            return
        rotated = int(head_dim * self.rope.partial_factor)
        if rotated < 2 or rotated % 2:
            raise ValueError(
                f"attention.rope.partial_factor={self.rope.partial_factor} rotates {rotated} of "
                f"head_dim={head_dim} dimensions; it must be even and >= 2"
            )

    def resolved(self, *, d_model: int) -> AttentionConfig:
        """This config with ``n_kv_heads`` and ``head_dim`` filled in for a model of width
        ``d_model`` (when ``None``)."""
        head_dim = self.head_dim
        if head_dim is None:
            if d_model % self.n_heads:
                raise ValueError(
                    f"d_model={d_model} must be divisible by attention.n_heads={self.n_heads} "
                    "(or set attention.head_dim)"
                )
            head_dim = d_model // self.n_heads
        return dataclasses.replace(self, n_kv_heads=self.kv_heads, head_dim=head_dim)

    @property
    def kv_heads(self) -> int:
        """Key/value heads (``n_kv_heads``, or ``n_heads`` when unset)."""
        return self.n_kv_heads or self.n_heads

    def head_width(self, d_model: int) -> int:
        """Per-head width on a stream of width ``d_model`` (``head_dim`` when set)."""
        return self.head_dim or d_model // self.n_heads

    def rotary_dim(self, d_model: int) -> int:
        """Width of the rotated part of each head (0 without rotary positions)."""
        if self.rope is None:
            return 0
        return int(self.head_width(d_model) * self.rope.partial_factor)

    def build(self, *, d_model: int, norm_eps: float = 1e-6) -> Attention:
        """The ``Attention`` of this config on a stream of width ``d_model`` (``norm_eps``: the
        query/key norms' epsilon)."""
        return Attention(self, d_model=d_model, norm_eps=norm_eps)


class Attention(nn.Module):
    """Multi-head self-attention with RoPE and grouped-query heads, via
    ``torch.nn.functional.scaled_dot_product_attention``; ``(B, S, D) -> (B, S, D)``."""

    #: the marker presets and LoRA find token mixers by (moekit.models.mixers.base)
    token_mixer: ClassVar[str] = "attention"

    def __init__(self, config: AttentionConfig, *, d_model: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        n_heads, n_kv_heads = config.n_heads, config.kv_heads
        head_dim = config.head_width(d_model)
        qkv_bias, o_bias, qk_norm = config.qkv_bias, config.o_bias, config.qk_norm
        self.config = config
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.causal, self.rotary = config.causal, config.rope is not None
        self.scale = head_dim**-0.5 if config.scale is None else config.scale
        self.rotary_dim = config.rotary_dim(d_model)
        config.check_rotated(head_dim)
        self.output_gate = config.output_gate
        q_width = n_heads * head_dim * (2 if config.output_gate else 1)
        self.q_proj = nn.Linear(d_model, q_width, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.values = ValueSource(config.values)
        self.v_proj = (
            None
            if self.values is ValueSource.KEYS
            else nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        )
        self.v_norm = (
            None
            if self.values is ValueSource.PROJECTED
            else nn.RMSNorm(head_dim, eps=norm_eps, elementwise_affine=False)
        )
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=o_bias)
        # GPT-OSS: a learned per-head logit that joins every softmax and takes some of its mass
        self.sinks = nn.Parameter(torch.zeros(n_heads)) if config.sinks else None
        self.sliding_window = config.sliding_window  # 0: attend to every earlier position
        self.chunk_size = config.chunk_size  # 0: no chunks
        self.query_temperature = config.query_temperature
        # RMSNorm on queries and keys before RoPE: per head (Qwen3) or over the whole
        # projection (OLMoE)
        self.qk_norm = qk_norm = QKNorm(qk_norm)
        self.q_norm = self.k_norm = None
        if qk_norm in (QKNorm.HEAD, QKNorm.HEAD_AFTER_ROPE):
            self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps)
            self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps)
        elif qk_norm is QKNorm.WEIGHTLESS:
            self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps, elementwise_affine=False)
            self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps, elementwise_affine=False)
        elif qk_norm is QKNorm.FULL:
            self.q_norm = nn.RMSNorm(n_heads * head_dim, eps=norm_eps)
            self.k_norm = nn.RMSNorm(n_kv_heads * head_dim, eps=norm_eps)
        elif qk_norm != "none":
            raise ValueError(
                f"qk_norm must be one of {', '.join(n.value for n in QKNorm)}, got {qk_norm!r}"
            )

    def cache_shapes(self, batch: int, max_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        shape = (batch, self.n_kv_heads, max_len, self.head_dim)
        return shape, shape

    def _masked_attention(self, q, k, v, allowed: torch.Tensor) -> torch.Tensor:
        """Explicit softmax attention for attention sinks (``(B, H, S, Dh)`` out)."""
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(2, 3)) * self.scale
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
        start: Start = 0,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
        x_BSD: ``(B, S, D)`` new positions ``start .. start+S-1``.
        rope: ``(cos, sin)`` tables covering those positions, ``(S, Dh)`` each, or
            ``(B, 1, S, Dh)`` when each sequence has its own positions (padding).
        cache: this layer's ``(keys, values)`` buffers ``(B, G, max_len, Dh)``; the new keys
            and values are written at ``start`` and attention covers ``0 .. start+S-1``.
        start: slot of the first new token: an ``int``, or a 0-dim device tensor for
            fixed-shape decoding (every cache slot is read, the later ones masked:
            ``moekit.models.common.cache``).
        key_mask: ``(B, start+S)`` (or ``(B, max_len)`` with a tensor ``start``) bool,
            ``True`` for real tokens; padding keys are hidden.
        """
        B, S, _ = x_BSD.shape
        q, k, v, gate = self._project(x_BSD)
        q, k = self._position(q, k, rope, start)
        if cache is not None:  # (a cache kept in another dtype reads back in the queries')
            k, v = append(cache, (k.to(q.dtype), v.to(q.dtype)), start)
        mask, is_causal = self._mask(S, k.shape[2], start, key_mask, x_BSD.device)
        out = self._attend(q, k, v, mask, is_causal, start)
        out = out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)

    def _project(
        self, x_BSD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Queries ``(B, H, S, Dh)``, keys and values ``(B, G, S, Dh)`` (q/k-normed as
        configured before rotation) and the output gate ``(B, S, H·Dh)`` or ``None``."""
        B, S, _ = x_BSD.shape
        q, k = self.q_proj(x_BSD), self.k_proj(x_BSD)
        v = k if self.v_proj is None else self.v_proj(x_BSD)  # values = keys (Gemma 4)
        v = v.view(B, S, self.n_kv_heads, self.head_dim)
        if self.v_norm is not None:
            v = self.v_norm(v)
        gate = None
        if self.output_gate:  # per head [query | gate]
            q, gate = q.view(B, S, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)
            q, gate = q.reshape(B, S, -1), gate.reshape(B, S, -1)
        if self.q_norm is not None and self.k_norm is not None and self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim)
        k = k.view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None and self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), gate

    def _position(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        start: Start,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding (full or partial), the q/k norms applied after it, and Llama 4's
        position-dependent query temperature."""
        if self.rotary and rope is not None:
            if self.rotary_dim == self.head_dim:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            else:  # partial rotary: the first rotary_dim dimensions carry the position
                r = self.rotary_dim
                q = torch.cat([apply_rotary(q[..., :r], *rope), q[..., r:]], dim=-1)
                k = torch.cat([apply_rotary(k[..., :r], *rope), k[..., r:]], dim=-1)
        if (
            self.q_norm is not None
            and self.k_norm is not None
            and self.qk_norm in ("head_after_rope", "weightless")
        ):
            q, k = self.q_norm(q), self.k_norm(k)
        temperature = self.query_temperature
        if temperature is not None:  # Llama 4: the queries' temperature grows with position
            S = q.shape[2]
            positions = new_positions(start, S, q.device).to(torch.float32)
            floors = torch.floor((positions + 1.0) / temperature.floor_scale)
            scales = torch.log1p(floors) * temperature.scale + 1.0
            q = (q * scales.view(1, 1, S, 1)).to(q.dtype)
        return q, k

    def _mask(
        self, S: int, L: int, start: Start, key_mask: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """The ``(B|1, 1, S, L)`` bool mask of allowed keys, or ``None`` with ``is_causal``
        when plain causal attention covers it (the fused kernels' fast path)."""
        fixed = not isinstance(start, int)  # fixed shapes: the mask hides unwritten slots
        if key_mask is None and not self.sliding_window and not self.chunk_size and not fixed:
            if not self.causal or S <= 1:
                return None, False
            if L == S:
                return None, True
            # new queries after cached positions: query i sees keys <= start + i
            return allowed_keys(S, L, start, causal=True, device=device), False
        mask = allowed_keys(
            S,
            L,
            start,
            causal=self.causal,
            window=self.sliding_window,
            chunk=self.chunk_size,
            key_mask_BL=key_mask,
            device=device,
        )
        return mask, False

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        start: Start,
    ) -> torch.Tensor:
        """``(B, H, S, Dh)``: softmax attention (explicit with sinks, else SDPA)."""
        S, L = q.shape[2], k.shape[2]
        if self.sinks is not None:
            if mask is None:
                mask = allowed_keys(S, L, start, causal=self.causal, device=q.device)
            return self._masked_attention(q, k, v, mask)
        grouped = self.n_kv_heads != self.n_heads
        if grouped and mask is not None and q.device.type == "cuda":
            # CUDA's fused kernels take GQA only without a mask: repeat the key/value heads
            # (a copy, far smaller than the math kernel's B*H*S*L scores)
            groups = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
            grouped = False
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=grouped, scale=self.scale
        )
