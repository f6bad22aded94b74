"""Router configuration: which routing family, and its options, picked by name.

Legend: T = tokens, D = d_model, E = experts, K = expert slots per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from torch import nn

from moekit.utils.validation import check_fields


class RouterKind(str, Enum):
    """The routing families (one module each in ``moekit.routing``)."""

    TOP_K = "top_k"  # token choice: softmax/sigmoid top-k, noisy top-k, Switch (k=1), DeepSeek
    DENSE = "dense"  # every expert, softmax weights (classic MoE; Eigen et al. 2013 MLP gate)
    GSHARD_TOP2 = "gshard_top2"  # top-2 with a randomly kept second expert (Lepikhin et al.)
    EXPERT_CHOICE = "expert_choice"  # each expert picks its top-c tokens (Zhou et al. 2022)
    SOFT = "soft"  # Soft MoE slots (Puigcerver et al. 2023)
    HASH = "hash"  # fixed hash of the token id (Roller et al. 2021)
    RANDOM_STATIC = "random_static"  # a fixed random token-id -> expert table
    BASE = "base"  # balanced assignment (BASE layers, Lewis et al. 2021)
    TOP_P = "top_p"  # adaptive number of experts: smallest set with mass >= p (Huang et al.)


class Gating(str, Enum):
    """How scores become top-K weights."""

    SOFTMAX_TOPK = "softmax_topk"
    TOPK_SOFTMAX = "topk_softmax"
    SIGMOID_TOPK = "sigmoid_topk"


class GroupScore(str, Enum):
    """How a group of experts is scored for group-limited selection."""

    MAX = "max"  # DeepSeek-V2: best expert score in the group
    TOP2_SUM = "top2_sum"  # DeepSeek-V3: sum of the group's two best scores


@dataclass(kw_only=True)
class RouterConfig:
    """Options of the token-choice top-k router (see the module docstring for the formulas).

    Args:
        kind: the routing family (``RouterKind``); the options below apply to the token-choice
            families unless marked otherwise.
        gating: ``softmax_topk``, ``topk_softmax`` or ``sigmoid_topk``.
        normalize_weights: renormalise the K weights to sum 1 (``softmax_topk``/``sigmoid_topk``).
        routed_scaling_factor: multiply the combine weights by this (DeepSeek).
        float32: compute the router in at least float32 whatever the input dtype.
        jitter_eps: multiplicative input jitter U(1-eps, 1+eps) on the router input in training.
        noisy_gating: Shazeer et al. 2017 noisy top-k gating (trainable noise, training only).
        bias: a learned bias in the router projection (GPT-OSS).
        num_groups: expert groups for group-limited selection (1 = off).
        topk_groups: groups kept per token.
        group_score: ``max`` or ``top2_sum``.
        bias_balancing: keep an expert bias for auxiliary-loss-free balancing (DeepSeek-V3).
        bias_update_rate: the fixed step ``u`` of ``b_i += u * sign(mean load - load_i)``.
        gate_hidden: ``dense``: 0 for a linear gate, else the hidden width of Eigen et al.'s
            linear-ReLU-linear gate.
        second_expert_policy: ``gshard_top2``: ``random`` (keep expert 2 with probability
            ``min(1, 2 g2)`` in training) or ``all``.
        expert_capacity: ``expert_choice``: average experts per token ``c``; each expert takes
            ``ceil(c T / E)`` tokens.
        slots_per_expert: ``soft``: slots each expert processes per sequence.
        hash_seed: ``hash``/``random_static``: seed of the fixed mapping.
        vocab_size: ``random_static``: size of the token-id table.
        exact_assignment_max_tokens: ``base``: solve exactly (Hungarian) up to this many tokens,
            Sinkhorn above.
        sinkhorn_iterations: ``base``: Sinkhorn iterations for large batches.
        top_p: ``top_p``: probability mass the chosen experts must reach (``top_k`` caps them).
    """

    kind: RouterKind = RouterKind.TOP_K
    gating: Gating = Gating.SOFTMAX_TOPK
    normalize_weights: bool = True
    routed_scaling_factor: float = 1.0
    float32: bool = True
    jitter_eps: float = 0.0
    noisy_gating: bool = False
    bias: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    group_score: GroupScore = GroupScore.MAX
    bias_balancing: bool = False
    bias_update_rate: float = 1e-3
    gate_hidden: int = 0
    second_expert_policy: str = "random"
    expert_capacity: float = 2.0
    slots_per_expert: int = 1
    hash_seed: int = 0
    vocab_size: int = 0
    exact_assignment_max_tokens: int = 512
    sinkhorn_iterations: int = 50
    top_p: float = 0.5

    def __post_init__(self) -> None:
        check_fields(self)
        if self.second_expert_policy not in ("random", "all"):
            raise ValueError(
                f"second_expert_policy must be 'random' or 'all', got {self.second_expert_policy!r}"
            )
        if self.gate_hidden < 0 or self.slots_per_expert < 1 or self.expert_capacity <= 0:
            raise ValueError("gate_hidden must be >= 0, slots_per_expert >= 1, expert_capacity > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.jitter_eps < 1.0:
            raise ValueError(f"jitter_eps must be in [0, 1), got {self.jitter_eps}")
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        if self.num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {self.num_groups}")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(
                f"topk_groups must be in [1, num_groups={self.num_groups}], got {self.topk_groups}"
            )
        if self.bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {self.bias_update_rate}")

    def validate_for(self, num_experts: int, top_k: int) -> None:
        """Check this config against the layer's E and K; raises ``ValueError`` naming the field."""
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if self.kind is RouterKind.GSHARD_TOP2 and top_k != 2:
            raise ValueError(f"kind='gshard_top2' needs top_k=2, got {top_k}")
        if self.kind in (RouterKind.HASH, RouterKind.RANDOM_STATIC, RouterKind.BASE) and top_k != 1:
            raise ValueError(f"kind={self.kind.value!r} routes each token to one expert: top_k=1")
        if self.kind is RouterKind.RANDOM_STATIC and self.vocab_size < 1:
            raise ValueError("kind='random_static' needs vocab_size (the token-id table size)")
        if num_experts % self.num_groups:
            raise ValueError(f"num_groups={self.num_groups} must divide num_experts={num_experts}")
        per_group = num_experts // self.num_groups
        if top_k > self.topk_groups * per_group:
            raise ValueError(
                f"top_k={top_k} exceeds the {self.topk_groups * per_group} experts in "
                f"topk_groups={self.topk_groups} groups of {per_group}"
            )
        if self.group_score is GroupScore.TOP2_SUM and self.num_groups > 1 and per_group < 2:
            raise ValueError("group_score='top2_sum' needs at least 2 experts per group")

    def build(self, d_model: int, num_experts: int, top_k: int) -> nn.Module:
        """The router module of this ``kind`` (see ``moekit.routing.registry``)."""
        from moekit.routing.registry import ROUTERS

        self.validate_for(num_experts, top_k)
        return ROUTERS[self.kind](d_model, num_experts, top_k, self)
