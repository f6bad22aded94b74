"""Router families by name: ``RouterKind`` -> module class."""

from __future__ import annotations

from typing import Any

from torch import nn

from moekit.routing.base_layers import BalancedAssignmentRouter
from moekit.routing.config import RouterKind
from moekit.routing.dense import DenseGateRouter
from moekit.routing.expert_choice import ExpertChoiceRouter
from moekit.routing.gshard import GShardTop2Router
from moekit.routing.hashing import HashRouter
from moekit.routing.soft import SoftMoERouter
from moekit.routing.top_p import TopPRouter
from moekit.routing.topk import TopKRouter

ROUTERS: dict[RouterKind, type[nn.Module]] = {
    RouterKind.TOP_K: TopKRouter,
    RouterKind.DENSE: DenseGateRouter,
    RouterKind.GSHARD_TOP2: GShardTop2Router,
    RouterKind.EXPERT_CHOICE: ExpertChoiceRouter,
    RouterKind.SOFT: SoftMoERouter,
    RouterKind.HASH: HashRouter,
    RouterKind.RANDOM_STATIC: HashRouter,
    RouterKind.BASE: BalancedAssignmentRouter,
    RouterKind.TOP_P: TopPRouter,
}


def is_causal(kind: RouterKind) -> bool:
    """Whether a token's routing never depends on later tokens."""
    router_cls: Any = ROUTERS[RouterKind(kind)]
    return bool(router_cls.causal)
