"""Router configuration: one small config per routing family, picked by ``kind``.

Legend: T = tokens, D = d_model, E = experts, K = expert slots per token.

``RouterConfig(kind=..., **options)`` returns the family's config (``TopKRouterConfig``,
``ExpertChoiceRouterConfig``, ...), and refuses an option the family does not have, naming the
family's options. Every family config has a ``kind`` (fixed), ``validate_for(E, K)`` and
``build(D, E, K)``.

Migration from the single flat ``RouterConfig`` of moekit 0.1 (22 fields for every family):
``RouterConfig(kind=..., ...)`` keeps working for every option that applies to the family;
``expert_capacity`` of expert choice is now ``capacity_factor`` (the old name still works, with
a ``DeprecationWarning``); a checkpoint written by 0.1 (all 22 fields, the foreign ones at their
defaults) loads as before. Options that never applied to a family (``top_p`` for expert choice,
say) used to be ignored silently and are now an error.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from torch import nn

from moekit.utils.validation import ConfigError, check_fields, coerce


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


class SecondExpertPolicy(str, Enum):
    """GShard's second expert in training."""

    RANDOM = "random"  # kept with probability min(1, 2 g2)
    ALL = "all"  # always kept


@dataclass(kw_only=True)
class RouterOptions:
    """What every family config shares: its ``kind`` (fixed), a check against the layer's E and
    K, and ``build``. Not built directly: use a family config or ``RouterConfig(kind=...)``."""

    kind: RouterKind = field(default=RouterKind.TOP_K, init=False)

    def __post_init__(self) -> None:
        check_fields(self)

    def validate_for(self, num_experts: int, top_k: int) -> None:
        """Check against the layer's E and K; raises ``ValueError`` naming the field."""
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")

    def build(self, d_model: int, num_experts: int, top_k: int) -> nn.Module:
        """The router module of this ``kind`` (see ``moekit.routing.registry``)."""
        from moekit.routing.registry import ROUTERS

        self.validate_for(num_experts, top_k)
        return ROUTERS[self.kind](d_model, num_experts, top_k, self)

    @classmethod
    def from_config_dict(cls, data: dict[str, Any], section: str = "router") -> RouterOptions:
        """The family config a dict describes (``kind`` picks the family); what
        ``config_from_dict`` calls for a router section."""
        from moekit.utils.serialization import config_from_dict

        options = dict(data)
        kind = coerce(options.pop("kind", RouterKind.TOP_K), RouterKind, f"{section}.kind")
        family = ROUTER_CONFIGS[kind]
        return config_from_dict(family, _family_options(kind, family, options, section), section)


@dataclass(kw_only=True)
class TopKRouterConfig(RouterOptions):
    """Token-choice top-K routing (``moekit.routing.topk`` has the formulas).

    Args:
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
    """

    kind: RouterKind = field(default=RouterKind.TOP_K, init=False)
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

    def __post_init__(self) -> None:
        super().__post_init__()
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
        super().validate_for(num_experts, top_k)
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


@dataclass(kw_only=True)
class DenseRouterConfig(RouterOptions):
    """Every expert, softmax weights (the classic mixture; Eigen et al. 2013's MLP gate).

    Args:
        gate_hidden: 0 for a linear gate, else the hidden width of a linear-ReLU-linear gate.
        float32, bias: as for top-k.
    """

    kind: RouterKind = field(default=RouterKind.DENSE, init=False)
    gate_hidden: int = 0
    float32: bool = True
    bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gate_hidden < 0:
            raise ValueError(f"gate_hidden must be >= 0, got {self.gate_hidden}")


@dataclass(kw_only=True)
class GShardRouterConfig(RouterOptions):
    """GShard's top-2 (Lepikhin et al. 2020).

    Args:
        second_expert_policy: ``random`` (keep expert 2 with probability ``min(1, 2 g2)`` in
            training) or ``all``.
        float32, bias: as for top-k.
    """

    kind: RouterKind = field(default=RouterKind.GSHARD_TOP2, init=False)
    second_expert_policy: SecondExpertPolicy = SecondExpertPolicy.RANDOM
    float32: bool = True
    bias: bool = False

    def validate_for(self, num_experts: int, top_k: int) -> None:
        super().validate_for(num_experts, top_k)
        if top_k != 2:
            raise ValueError(f"kind='gshard_top2' needs top_k=2, got {top_k}")


@dataclass(kw_only=True)
class ExpertChoiceRouterConfig(RouterOptions):
    """Expert-choice routing (Zhou et al. 2022).

    Args:
        capacity_factor: the paper's capacity factor ``c``, the average number of experts per
            token: each expert takes ``ceil(c T / E)`` tokens.
        float32, bias: as for top-k.
    """

    kind: RouterKind = field(default=RouterKind.EXPERT_CHOICE, init=False)
    capacity_factor: float = 2.0
    float32: bool = True
    bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")


@dataclass(kw_only=True)
class SoftRouterConfig(RouterOptions):
    """Soft MoE (Puigcerver et al. 2023).

    Args:
        slots_per_expert: slots each expert processes per sequence.
        float32: as for top-k.
    """

    kind: RouterKind = field(default=RouterKind.SOFT, init=False)
    slots_per_expert: int = 1
    float32: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.slots_per_expert < 1:
            raise ValueError(f"slots_per_expert must be >= 1, got {self.slots_per_expert}")


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


@dataclass(kw_only=True)
class BaseRouterConfig(RouterOptions):
    """Balanced assignment (BASE layers, Lewis et al. 2021).

    Args:
        exact_assignment_max_tokens: solve exactly (Hungarian) up to this many tokens,
            Sinkhorn above.
        sinkhorn_iterations: Sinkhorn iterations for large batches.
        float32, bias: as for top-k.
    """

    kind: RouterKind = field(default=RouterKind.BASE, init=False)
    exact_assignment_max_tokens: int = 512
    sinkhorn_iterations: int = 50
    float32: bool = True
    bias: bool = False

    def validate_for(self, num_experts: int, top_k: int) -> None:
        super().validate_for(num_experts, top_k)
        _one_expert_per_token(self.kind, top_k)


@dataclass(kw_only=True)
class TopPRouterConfig(RouterOptions):
    """Adaptive number of experts per token (Huang et al. 2024): the smallest set whose
    probability mass reaches ``top_p``, at most ``top_k``.

    Args:
        top_p: probability mass the chosen experts must reach.
        normalize_weights: renormalise the chosen weights to sum 1.
        float32, bias: as for top-k.
    """

    kind: RouterKind = field(default=RouterKind.TOP_P, init=False)
    top_p: float = 0.5
    normalize_weights: bool = True
    float32: bool = True
    bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


ROUTER_CONFIGS: dict[RouterKind, type[RouterOptions]] = {
    RouterKind.TOP_K: TopKRouterConfig,
    RouterKind.DENSE: DenseRouterConfig,
    RouterKind.GSHARD_TOP2: GShardRouterConfig,
    RouterKind.EXPERT_CHOICE: ExpertChoiceRouterConfig,
    RouterKind.SOFT: SoftRouterConfig,
    RouterKind.HASH: HashRouterConfig,
    RouterKind.RANDOM_STATIC: RandomStaticRouterConfig,
    RouterKind.BASE: BaseRouterConfig,
    RouterKind.TOP_P: TopPRouterConfig,
}

# Every option of moekit 0.1's flat RouterConfig with its default: a 0.1 checkpoint holds all of
# them, so an option foreign to the family is dropped when it still has this value.
_LEGACY_DEFAULTS: dict[str, Any] = {
    "gating": "softmax_topk",
    "normalize_weights": True,
    "routed_scaling_factor": 1.0,
    "float32": True,
    "jitter_eps": 0.0,
    "noisy_gating": False,
    "bias": False,
    "num_groups": 1,
    "topk_groups": 1,
    "group_score": "max",
    "bias_balancing": False,
    "bias_update_rate": 1e-3,
    "gate_hidden": 0,
    "second_expert_policy": "random",
    "expert_capacity": 2.0,
    "slots_per_expert": 1,
    "hash_seed": 0,
    "vocab_size": 0,
    "exact_assignment_max_tokens": 512,
    "sinkhorn_iterations": 50,
    "top_p": 0.5,
}


def _family_options(
    kind: RouterKind, family: type[RouterOptions], options: dict[str, Any], section: str
) -> dict[str, Any]:
    """``options`` for ``family``: the renamed option mapped, 0.1 defaults of foreign options
    dropped, any other foreign option refused by name."""
    names = {f.name for f in dataclasses.fields(family) if f.init}
    if "expert_capacity" in options and kind is RouterKind.EXPERT_CHOICE:
        if "capacity_factor" not in options:
            warnings.warn(
                f"{section}.expert_capacity is now {section}.capacity_factor",
                DeprecationWarning,
                stacklevel=4,
            )
            options["capacity_factor"] = options["expert_capacity"]
        del options["expert_capacity"]
    foreign = {}
    for name in sorted(set(options) - names):
        value = options.pop(name)
        legacy = _LEGACY_DEFAULTS.get(name, object())
        if value != legacy and getattr(value, "value", None) != legacy:
            foreign[name] = value
    if foreign:
        raise ConfigError(
            f"{section}: option(s) {', '.join(f'{k}={v!r}' for k, v in foreign.items())} do not "
            f"apply to router kind {kind.value!r}, whose options are: {', '.join(sorted(names))}"
        )
    return options


def RouterConfig(kind: RouterKind | str = RouterKind.TOP_K, **options: Any) -> RouterOptions:
    """The config of router family ``kind`` with ``options`` (see the module docstring)."""
    family_kind: RouterKind = coerce(kind, RouterKind, "kind")
    family = ROUTER_CONFIGS[family_kind]
    return family(**_family_options(family_kind, family, dict(options), "router"))
