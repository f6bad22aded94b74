"""Routing by token id, with no learned parameters (Roller et al. 2021, "Hash Layers For Large
Sparse Models").

``hash``: expert = a fixed universal hash of the token id, ``((a * id + b) mod p) mod E`` with
``a, b`` drawn once from ``hash_seed`` and ``p`` the Mersenne prime 2^31 - 1.
``random_static``: expert = ``table[id]``, a fixed random table of ``vocab_size`` entries.
Both are pure functions of the token id (so causal), weight 1, and need ``token_ids``.

``token_table`` (DeepSeek-V4's hash layers): the K experts of a token are ``table[id]``, a
``(vocab_size, K)`` token-id -> experts table that comes with the checkpoint (computed offline;
a seeded random table of distinct experts until one is loaded), while a learned gate's scores
(``gating``: softmax, sigmoid or sqrt-softplus) weight them, optionally renormalised and scaled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moekit.routing.config import GatedRouter, GateOptions, RouterBase, RouterKind, RouterOptions
from moekit.routing.result import RoutingResult
from moekit.routing.topk import Gating

_PRIME = 2**31 - 1


def _one_expert_per_token(kind: RouterKind, top_k: int) -> None:
    if top_k != 1:
        raise ValueError(f"kind={kind.value!r} routes each token to one expert: top_k=1")


@dataclass(kw_only=True)
class HashRouterConfig(RouterOptions):
    """Routing by a fixed hash of the token id (Roller et al. 2021).

    Args:
        hash_seed: seed of the fixed mapping.
    """

    kind: RouterKind = field(default=RouterKind.HASH, init=False)
    hash_seed: int = 0

    def validate_for(self, num_experts: int, top_k: int) -> None:
        super().validate_for(num_experts, top_k)
        _one_expert_per_token(self.kind, top_k)

    def build(self, *, d_model: int, num_experts: int, top_k: int) -> HashRouter:
        """The ``HashRouter`` of this config."""
        return HashRouter(self, d_model=d_model, num_experts=num_experts, top_k=top_k)


@dataclass(kw_only=True)
class RandomStaticRouterConfig(RouterOptions):
    """Routing by a fixed random token-id -> expert table.

    Args:
        vocab_size: size of the token-id table.
        hash_seed: seed of the table.
    """

    kind: RouterKind = field(default=RouterKind.RANDOM_STATIC, init=False)
    vocab_size: int = 0
    hash_seed: int = 0

    def validate_for(self, num_experts: int, top_k: int) -> None:
        super().validate_for(num_experts, top_k)
        _one_expert_per_token(self.kind, top_k)
        if self.vocab_size < 1:
            raise ValueError("kind='random_static' needs vocab_size (the token-id table size)")

    def build(self, *, d_model: int, num_experts: int, top_k: int) -> HashRouter:
        """The ``HashRouter`` of this config."""
        return HashRouter(self, d_model=d_model, num_experts=num_experts, top_k=top_k)


class HashRouter(RouterBase):
    """``(T, D), token ids (T,) -> RoutingResult`` with K = 1 and weight 1."""

    needs_token_ids = True

    def __init__(
        self,
        config: HashRouterConfig | RandomStaticRouterConfig,
        *,
        d_model: int,
        num_experts: int,
        top_k: int,
    ) -> None:
        super().__init__(config, d_model=d_model, num_experts=num_experts, top_k=top_k)
        generator = torch.Generator().manual_seed(config.hash_seed)
        if isinstance(config, RandomStaticRouterConfig):
            table = torch.randint(0, num_experts, (config.vocab_size,), generator=generator)
            self.register_buffer("table_V", table)
        else:
            a, b = torch.randint(1, _PRIME, (2,), generator=generator).tolist()
            self.hash_a, self.hash_b = a, b
            self.table_V = None

    def expert_of(self, token_ids_T: torch.Tensor) -> torch.Tensor:
        """The expert of each token id, ``(T,)``."""
        if token_ids_T.is_floating_point() or token_ids_T.is_complex():
            raise TypeError(f"token_ids must be an integer tensor, got {token_ids_T.dtype}")
        if self.table_V is not None:
            if token_ids_T.numel() and (
                int(token_ids_T.min()) < 0 or int(token_ids_T.max()) >= len(self.table_V)
            ):
                raise ValueError(
                    f"token_ids must be in [0, vocab_size={len(self.table_V)}), got values in "
                    f"[{int(token_ids_T.min())}, {int(token_ids_T.max())}]"
                )
            return self.table_V[token_ids_T]
        if token_ids_T.numel() and int(token_ids_T.min()) < 0:
            raise ValueError(f"token_ids must be >= 0, got {int(token_ids_T.min())}")
        return ((self.hash_a * token_ids_T.long() + self.hash_b) % _PRIME) % self.num_experts

    def forward(
        self,
        x_TD: torch.Tensor,
        token_ids_T: torch.Tensor | None = None,
        token_mask_T: torch.Tensor | None = None,
    ) -> RoutingResult:
        if token_ids_T is None:
            raise ValueError(
                f"router kind {self.config.kind.value!r} routes by token id: pass token_ids"
            )
        expert_T = self.expert_of(token_ids_T.reshape(-1))
        logits_TE = F.one_hot(expert_T, self.num_experts).to(torch.float32)
        weights_TK = torch.ones(len(expert_T), 1, dtype=torch.float32, device=x_TD.device)
        return RoutingResult(expert_T.unsqueeze(1), weights_TK, logits_TE, logits_TE)


@dataclass(kw_only=True)
class TokenTableRouterConfig(GateOptions, RouterOptions):
    """Experts from a token-id table, weights from a learned gate (DeepSeek-V4's hash layers).

    Args:
        vocab_size: rows of the table (the model's vocabulary).
        gating: how the gate's logits become scores: ``softmax_topk`` (softmax),
            ``sigmoid_topk`` (sigmoid) or ``sqrt_softplus_topk`` (``sqrt(softplus(.))``).
        normalize_weights: renormalise the K weights to sum 1.
        routed_scaling_factor: multiply the weights by this.
        hash_seed: seed of the initial random table (replaced by a checkpoint's).
        float32, bias: see ``GateOptions``.
    """

    kind: RouterKind = field(default=RouterKind.TOKEN_TABLE, init=False)
    vocab_size: int = 0
    gating: Gating = Gating.SQRT_SOFTPLUS_TOPK
    normalize_weights: bool = True
    routed_scaling_factor: float = 1.0
    hash_seed: int = 0

    def validate_for(self, num_experts: int, top_k: int) -> None:
        super().validate_for(num_experts, top_k)
        if self.vocab_size < 1:
            raise ValueError("kind='token_table' needs vocab_size (the token-id table's rows)")
        if self.gating is Gating.TOPK_SOFTMAX:
            raise ValueError("kind='token_table' scores with softmax, sigmoid or sqrt-softplus")

    def build(self, *, d_model: int, num_experts: int, top_k: int) -> TokenTableRouter:
        return TokenTableRouter(self, d_model=d_model, num_experts=num_experts, top_k=top_k)


class TokenTableRouter(GatedRouter):
    """``(T, D), token ids (T,) -> RoutingResult``: experts ``table_VK[id]``, weights from the
    gate ``weight_ED``. The table is a buffer (saved and loaded with the weights)."""

    needs_token_ids = True
    table_VK: torch.Tensor

    def __init__(
        self, config: TokenTableRouterConfig, *, d_model: int, num_experts: int, top_k: int
    ) -> None:
        super().__init__(config, d_model=d_model, num_experts=num_experts, top_k=top_k)
        generator = torch.Generator().manual_seed(config.hash_seed)
        table = torch.stack(
            [
                torch.randperm(num_experts, generator=generator)[:top_k]
                for _ in range(config.vocab_size)
            ]
        )
        self.register_buffer("table_VK", table)

    def forward(
        self,
        x_TD: torch.Tensor,
        token_ids_T: torch.Tensor | None = None,
        token_mask_T: torch.Tensor | None = None,
    ) -> RoutingResult:
        if token_ids_T is None:
            raise ValueError("router kind 'token_table' routes by token id: pass token_ids")
        cfg = self.config
        logits_TE = self.gate_logits(x_TD)
        if cfg.gating is Gating.SQRT_SOFTPLUS_TOPK:
            scores_TE = F.softplus(logits_TE).sqrt()
        elif cfg.gating is Gating.SIGMOID_TOPK:
            scores_TE = torch.sigmoid(logits_TE)
        else:
            scores_TE = torch.softmax(logits_TE, dim=-1)
        expert_idx_TK = self.table_VK[token_ids_T.reshape(-1).long()].long()
        weights_TK = scores_TE.gather(-1, expert_idx_TK)
        if cfg.normalize_weights:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.routed_scaling_factor != 1.0:
            weights_TK = weights_TK * cfg.routed_scaling_factor
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp(min=1e-20)
        return RoutingResult(expert_idx_TK, weights_TK, logits_TE, probs_TE)
