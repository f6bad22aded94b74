"""Mixture of attention heads (MoA; Zhang et al. 2022, "Mixture of Attention Heads"; JetMoE):
an MoE *of attention*.

Legend: B = batch, S = new positions, L = cached + new positions, T = B*S tokens, D = d_model,
E = attention experts, K = experts per token, G = key/value heads, Dh = head width,
X = G*Dh, M = T*K assignments sorted by expert.

Keys and values are shared: one projection ``kv_proj`` gives ``G`` key/value heads. Each
attention expert owns a query projection ``D -> X`` and an output projection ``X -> D``. A router
(top-K logits, softmax over those K) picks K experts per token; slot ``j``'s query (G heads)
attends over the shared keys like grouped-query attention, and the K slot outputs, each through
its expert's output projection, are summed with the router weights, plus a shared output bias.
The projections run as grouped matmuls over the assignments sorted by expert (no loop over
tokens or experts); the attention itself is one ``scaled_dot_product_attention`` with the K
slots as query heads grouped onto the G key/value heads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moekit.dispatch.sort import plan_dispatch
from moekit.experts.grouped_linear import grouped_linear
from moekit.losses.auxiliary import auxiliary_losses, weighted_sum
from moekit.losses.config import AuxLossConfig
from moekit.models.common.attention_base import AttentionMixerConfig
from moekit.models.common.cache import Start, append
from moekit.models.common.masks import allowed_keys
from moekit.models.common.rotary import RotaryConfig, apply_rotary
from moekit.routing.topk import Gating, TopKRouterConfig
from moekit.utils.validation import check_fields


@dataclass(kw_only=True)
class MoAConfig(AttentionMixerConfig):
    """A mixture of attention heads (kind ``moa``, a sibling of ``AttentionConfig``):
    ``num_experts`` query/output projection pairs, ``top_k`` of them per token, over
    ``n_kv_heads`` shared key/value heads of ``head_dim``; ``n_heads`` is ``top_k *
    n_kv_heads``.

    Args:
        num_experts: E.
        top_k: K.
        n_kv_heads: G, the shared key/value heads.
        head_dim: Dh; ``None`` means ``d_model // n_heads``.
        causal: each position sees only earlier ones.
        rope: the rotary positions (the whole head rotates).
        output_bias: a learned bias added to the attention output (JetMoE).
        aux_loss: the balancing losses of the attention router (Switch loss, z-loss, ...),
            added to the model's ``aux_loss`` like an MoE layer's.
    """

    kind: ClassVar[str] = "moa"

    num_experts: int
    top_k: int
    n_kv_heads: int
    head_dim: int | None = None
    causal: bool = True
    rope: RotaryConfig = field(default_factory=RotaryConfig)
    output_bias: bool = True
    aux_loss: AuxLossConfig = field(default_factory=AuxLossConfig)

    def __post_init__(self) -> None:
        check_fields(self, "attention.")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"attention.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
        if self.n_kv_heads < 1:
            raise ValueError(f"attention.n_kv_heads must be >= 1, got {self.n_kv_heads}")
        if self.rope.partial_factor != 1.0:
            raise ValueError("attention.rope.partial_factor: a mixture of heads rotates all")
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            raise ValueError(f"attention.head_dim must be even and >= 2, got {self.head_dim}")

    @property
    def n_heads(self) -> int:
        """Query heads per token: ``top_k * n_kv_heads``."""
        return self.top_k * self.n_kv_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads

    def head_width(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def rotary_dim(self, d_model: int) -> int:
        return self.head_width(d_model)

    def resolved(self, *, d_model: int) -> MoAConfig:
        """This config with ``head_dim`` filled in for a model of width ``d_model``."""
        if self.head_dim is None and d_model % self.n_heads:
            raise ValueError(
                f"d_model={d_model} must be divisible by n_heads={self.n_heads} (top_k x "
                "n_kv_heads), or set attention.head_dim"
            )
        return dataclasses.replace(self, head_dim=self.head_width(d_model))

    def build(self, *, d_model: int, norm_eps: float = 1e-6) -> MixtureOfAttentionHeads:
        """The ``MixtureOfAttentionHeads`` on a stream of width ``d_model`` (it has no norm:
        ``norm_eps`` is unused)."""
        return MixtureOfAttentionHeads(self, d_model=d_model)


class MixtureOfAttentionHeads(nn.Module):
    """``(B, S, D) -> (B, S, D)``; parameters: the router ``router.weight_ED``, ``w_q_EDX``,
    ``w_o_EXD``, ``kv_proj`` (``D -> 2X``: keys then values), ``bias_D``."""

    #: the marker presets and LoRA find token mixers by (moekit.models.mixers.base)
    token_mixer: ClassVar[str] = "attention"
    #: LoRA adapts no linear of it (its expert projections are stacked tensors)
    lora_on_linears: ClassVar[bool] = False

    def __init__(self, moa: MoAConfig, *, d_model: int) -> None:
        super().__init__()
        self.moa = moa
        n_kv_heads, head_dim = moa.n_kv_heads, moa.head_width(d_model)
        self.n_kv_heads, self.head_dim, self.causal = n_kv_heads, head_dim, moa.causal
        self.rotary = True
        width = n_kv_heads * head_dim
        E, K = moa.num_experts, moa.top_k
        self.router = TopKRouterConfig(gating=Gating.TOPK_SOFTMAX).build(
            d_model=d_model, num_experts=E, top_k=K
        )
        scale_in, scale_out = d_model**-0.5, width**-0.5
        self.w_q_EDX = nn.Parameter(torch.randn(E, d_model, width) * scale_in)
        self.w_o_EXD = nn.Parameter(torch.randn(E, width, d_model) * scale_out)
        self.kv_proj = nn.Linear(d_model, 2 * width, bias=False)
        self.bias_D = nn.Parameter(torch.zeros(d_model)) if moa.output_bias else None
        # off inside ``moekit.serving(model)``, as for MoE layers
        self.losses_enabled = True

    def cache_shapes(self, batch: int, max_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        shape = (batch, self.n_kv_heads, max_len, self.head_dim)
        return shape, shape

    def forward(
        self,
        x_BSD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: Start = 0,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, S, D) -> (B, S, D)``, as ``Attention.forward``; the router's loss is in
        :meth:`forward_with_loss`."""
        return self.forward_with_loss(x_BSD, rope, cache, start, key_mask)[0]

    def forward_with_loss(
        self,
        x_BSD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: Start = 0,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output and the router's weighted auxiliary loss (``None`` when losses are off):
        the block adds it to the model's, through the return value."""
        B, S, D = x_BSD.shape
        aux_loss = None
        G, Dh, K = self.n_kv_heads, self.head_dim, self.moa.top_k
        x_TD = x_BSD.reshape(-1, D)
        routing = self.router(x_TD)
        if self.losses_enabled:
            real_T = None
            if key_mask is not None and key_mask.dim() == 2:  # this call's tokens: the last S
                real_T = key_mask[:, -S:].reshape(-1)
            losses = auxiliary_losses(routing, self.moa.aux_loss, token_mask_T=real_T)
            zero = routing.weights_TK.new_zeros(())
            aux_loss = weighted_sum(losses, self.moa.aux_loss, start=zero)
        plan = plan_dispatch(routing.expert_idx_TK, routing.weights_TK, self.moa.num_experts)
        counts_E = plan.kept_per_expert_E
        # queries: each assignment's token through its expert, back in slot order t*K + j
        q_MX = grouped_linear(x_TD[plan.token_idx_M], self.w_q_EDX.to(x_TD.dtype), counts_E)
        q_AX = torch.empty_like(q_MX).index_copy_(0, plan.assignment_idx_M, q_MX)
        # (B, S, K, G, Dh) -> (B, G*K, S, Dh): slot j of kv head g is query head g*K + j
        q = q_AX.view(B, S, K, G, Dh).permute(0, 3, 2, 1, 4).reshape(B, G * K, S, Dh)
        k, v = self.kv_proj(x_BSD).chunk(2, dim=-1)
        k = k.view(B, S, G, Dh).transpose(1, 2)
        v = v.view(B, S, G, Dh).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = append(cache, (k.to(q.dtype), v.to(q.dtype)), start)
        L = k.shape[2]
        mask = None
        if key_mask is not None or (self.causal and S > 1) or not isinstance(start, int):
            mask = allowed_keys(
                S, L, start, causal=self.causal, key_mask_BL=key_mask, device=x_BSD.device
            )
        if K > 1 and (mask is not None and q.device.type == "cuda"):
            k, v = k.repeat_interleave(K, dim=1), v.repeat_interleave(K, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=K > 1)
        # (B, G*K, S, Dh) -> slot order (T*K, X), then each slot through its expert's output
        out_AX = out.view(B, G, K, S, Dh).permute(0, 3, 2, 1, 4).reshape(B * S * K, G * Dh)
        y_MD = grouped_linear(
            out_AX[plan.assignment_idx_M].contiguous(), self.w_o_EXD.to(out_AX.dtype), counts_E
        )
        y_MD = y_MD * plan.weights_M.unsqueeze(-1).to(y_MD.dtype)
        y_TD = torch.zeros_like(x_TD).index_add_(0, plan.token_idx_M, y_MD.to(x_TD.dtype))
        if self.bias_D is not None:
            y_TD = y_TD + self.bias_D.to(y_TD.dtype)
        return y_TD.view(B, S, D), aux_loss
