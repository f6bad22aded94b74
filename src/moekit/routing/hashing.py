"""Routing by token id, with no learned parameters (Roller et al. 2021, "Hash Layers For Large
Sparse Models").

``hash``: expert = a fixed universal hash of the token id, ``((a * id + b) mod p) mod E`` with
``a, b`` drawn once from ``hash_seed`` and ``p`` the Mersenne prime 2^31 - 1.
``random_static``: expert = ``table[id]``, a fixed random table of ``vocab_size`` entries.
Both are pure functions of the token id (so causal), weight 1, and need ``token_ids``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.routing.config import HashRouterConfig, RandomStaticRouterConfig
from moekit.routing.result import RoutingResult

_PRIME = 2**31 - 1


class HashRouter(nn.Module):
    """``(T, D), token ids (T,) -> RoutingResult`` with K = 1 and weight 1."""

    causal = True
    needs_token_ids = True

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        config: HashRouterConfig | RandomStaticRouterConfig,
    ) -> None:
        super().__init__()
        self.config, self.d_model, self.num_experts, self.top_k = config, d_model, num_experts, 1
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
