"""What every router shares: its family (``RouterKind``), the base of the family configs, the
common gate options, the common router header, and ``RouterConfig(kind=...)`` for configs read
from files.

Legend: D = d_model, E = experts, K = expert slots per token.

Each family's config sits beside its router (``TopKRouterConfig`` in ``routing/topk.py``,
``SoftRouterConfig`` in ``routing/soft.py``, ...): a keyword-only dataclass whose fields an editor
completes, with ``validate_for(E, K)`` and ``build(*, d_model, num_experts, top_k)``. Families
register themselves by ``kind`` when their module is imported (``moekit.routing`` imports them
all), so this module imports no router.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import nn

from moekit.routing.projection import linear_logits, new_router_weight
from moekit.utils.serialization import config_from_dict
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
    SPARSEMIXER = "sparsemixer"  # sampled top-k with GRIN's gradient (Phi-3.5-MoE)
    TOKEN_TABLE = "token_table"  # experts from a token-id table, weights from a gate (DSV4)
    EXPERT_THRESHOLD = "expert_threshold"  # causal expert choice: thresholds from past batches
    CAUSAL_SOFT = "causal_soft"  # Soft MoE with slots mixed from past tokens only


# every family config by kind, filled as the family modules are imported
ROUTER_CONFIGS: dict[RouterKind, type[RouterOptions]] = {}


@dataclass(kw_only=True)
class RouterOptions:
    """What every family config shares: its ``kind`` (fixed), whether its routing is causal, a
    check against the layer's E and K, and ``build``. Not built directly: use a family config
    (``moekit.TopKRouterConfig(...)``) or ``RouterConfig(kind=...)``."""

    kind: RouterKind = field(default=RouterKind.TOP_K, init=False)
    causal: ClassVar[bool] = True  # a token's route never depends on later tokens

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # the class body's own ``kind`` (a dataclass field: the decorator has not run yet)
        declared = cls.__dict__.get("kind")
        kind = declared.default if isinstance(declared, dataclasses.Field) else declared
        if isinstance(kind, RouterKind):
            ROUTER_CONFIGS[kind] = cls

    def __post_init__(self) -> None:
        check_fields(self)

    def validate_for(self, num_experts: int, top_k: int) -> None:
        """Check against the layer's E and K; raises ``ValueError`` naming the field."""
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")

    def build(self, *, d_model: int, num_experts: int, top_k: int) -> nn.Module:
        """The router module of this family for a layer of width D with E experts and K slots
        per token (checked first)."""
        raise NotImplementedError(f"{type(self).__name__} has no router")

    @classmethod
    def from_config_dict(cls, data: dict[str, Any], section: str = "router") -> RouterOptions:
        """The family config a dict describes (``kind`` picks the family); what
        ``config_from_dict`` calls for a router section."""

        options = dict(data)
        kind = coerce(options.pop("kind", RouterKind.TOP_K), RouterKind, f"{section}.kind")
        family = ROUTER_CONFIGS[kind]
        return config_from_dict(family, _family_options(kind, family, options, section), section)


@dataclass(kw_only=True)
class GateOptions:
    """The options of every router with a learned linear gate ``x W^T (+ b)``.

    Args:
        float32: compute the router (and the auxiliary losses) in at least float32 whatever the
            input dtype, with autocast off.
        bias: a learned bias in the gate projection (GPT-OSS).
    """

    float32: bool = True
    bias: bool = False


class RouterBase(nn.Module):
    """The common header of the routers: their config and the layer's D, E and K.

    Args:
        config: the family's config (checked against ``num_experts`` and ``top_k``).
        d_model: D.
        num_experts: E.
        top_k: K (what the layer was built with; a family may route to another number per
            token, e.g. every expert, and sets ``self.top_k``).
    """

    def __init__(self, config: Any, *, d_model: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        config.validate_for(num_experts, top_k)
        self.config = config
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k

    @property
    def causal(self) -> bool:
        """Whether a token's route never depends on later tokens (the family's)."""
        return bool(self.config.causal)

    def extra_repr(self) -> str:
        return (
            f"kind={self.config.kind.value}, d_model={self.d_model}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}"
        )


class GatedRouter(RouterBase):
    """A router with a learned linear gate ``x W^T (+ b)`` (its config's ``GateOptions``):
    owns the parameters ``weight_ED`` ``(E, D)`` (``nn.Linear`` layout and initialisation) and
    ``bias_E`` (or ``None``), and computes the logits (:meth:`gate_logits`). The families
    with a plain gate build on it; their ``__init__`` adds only what is theirs."""

    def __init__(self, config: Any, *, d_model: int, num_experts: int, top_k: int) -> None:
        super().__init__(config, d_model=d_model, num_experts=num_experts, top_k=top_k)
        self.weight_ED, self.bias_E = new_router_weight(d_model, num_experts, bias=config.bias)

    def gate_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``(T, D) -> (T, E)`` logits, in at least float32 when the config's ``float32``."""
        return linear_logits(x_TD, self.weight_ED, self.bias_E, self.config.float32)


def is_causal(kind: RouterKind | str) -> bool:
    """Whether a token's routing in family ``kind`` never depends on later tokens."""
    return ROUTER_CONFIGS[RouterKind(kind)].causal


def _family_options(
    kind: RouterKind, family: type[RouterOptions], options: dict[str, Any], section: str
) -> dict[str, Any]:
    """``options`` for ``family``, any option the family does not have refused by name."""
    names = {f.name for f in dataclasses.fields(family) if f.init}
    foreign = sorted(set(options) - names)
    if foreign:
        raise ConfigError(
            f"{section}: option(s) {', '.join(f'{k}={options[k]!r}' for k in foreign)} do not "
            f"apply to router kind {kind.value!r}, whose options are: {', '.join(sorted(names))}"
        )
    return options


def RouterConfig(kind: RouterKind | str = RouterKind.TOP_K, **options: Any) -> RouterOptions:
    """The config of router family ``kind`` with ``options``, for options held as data (a config
    file, a sweep). In code, the family configs are typed and completable:
    ``TopKRouterConfig(gating=...)``, ``SoftRouterConfig(slots_per_expert=2)``, ..."""
    family_kind: RouterKind = coerce(kind, RouterKind, "kind")
    family = ROUTER_CONFIGS[family_kind]
    return family(**_family_options(family_kind, family, dict(options), "router"))
