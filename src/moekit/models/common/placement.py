"""Which FFNs of a transformer are MoE layers, and the MoE layer each becomes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moekit.layers import MoEConfig
from moekit.routing import RouterKind, RouterOptions
from moekit.utils.validation import ConfigError, check_fields

_SOFT = (RouterKind.SOFT, RouterKind.CAUSAL_SOFT)  # routers that mix tokens into slots


@dataclass(kw_only=True)
class MoEPlacementConfig:
    """Which FFNs of a model are MoE layers, and the MoE layer each of them becomes.

    Args:
        layer: the MoE layer of every MoE block (built at the model's width). ``None``
            makes every FFN dense (the baseline). In a causal LM its dispatch must be dropless
            or capacity with ``drop_priority='token'`` (the only order in which no token's
            capacity depends on later tokens).
        every: an MoE layer in every n-th block (layer ``i`` is MoE when ``(i + 1) % every == 0``).
        first_dense: the first n blocks always use a dense FFN (DeepSeek).
        experts_per_layer: routed experts of each MoE block, in order, where they differ from
            ``layer.num_experts`` (after pruning or merging); ``None``: all the same.
        layers: the MoE blocks by index, when no ``every``/``first_dense`` rule gives them
            (Switch Transformer checkpoints: blocks 1, 3, 5, ...; Llama 4's interleaving);
            ``None``: the rule.
        hash_layers: the first ``hash_layers`` MoE blocks route with ``hash_router`` instead of
            ``layer.router`` (DeepSeek-V4's hash layers: experts from a token-id table, weights
            from a learned gate).
        hash_router: the router of those blocks (a ``TokenTableRouterConfig``, or any router).
        dense_beside: every MoE block also runs the model's dense FFN beside its MoE layer,
            each branch with its own pre and post norms, the router reading the block's input
            (Gemma 4; ``moekit.layers.dense_beside``); without ``layer`` the blocks are dense
            (the dense twin of such a model, as upcycling starts from).
    """

    layer: MoEConfig | None = None
    every: int = 1
    first_dense: int = 0
    experts_per_layer: list[int] | None = None
    layers: list[int] | None = None
    hash_layers: int = 0
    hash_router: RouterOptions | None = None
    dense_beside: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if self.hash_layers < 0 or (self.hash_layers > 0) != (self.hash_router is not None):
            raise ValueError(
                f"moe.hash_layers={self.hash_layers} and moe.hash_router go together (both set, "
                "or neither)"
            )
        if self.hash_router is not None and self.layer is not None:
            self.hash_router.validate_for(self.layer.num_experts, self.layer.top_k)
        if self.dense_beside and self.layer is not None and self.layer.router.kind in _SOFT:
            raise ValueError(
                f"moe.dense_beside routes on the block's input, which a Soft MoE router "
                f"(moe.layer.router.kind={self.layer.router.kind.value!r}) cannot; use a "
                "token-choice router"
            )
        if self.layers is not None and (
            any(i < 0 for i in self.layers) or sorted(set(self.layers)) != list(self.layers)
        ):
            raise ValueError(
                f"moe.layers must be distinct block indices >= 0 in increasing order, got "
                f"{self.layers}"
            )
        if self.every < 1 or self.first_dense < 0:
            raise ValueError(
                f"moe.every must be >= 1 and moe.first_dense >= 0, got every={self.every}, "
                f"first_dense={self.first_dense}"
            )
        if self.experts_per_layer is not None:
            if self.layer is None:
                raise ValueError("moe.experts_per_layer needs moe.layer")
            k = self.layer.top_k
            for count in self.experts_per_layer:
                if count < max(1, k):
                    raise ValueError(
                        f"moe.experts_per_layer entries must be >= top_k={k} (and >= 1), got "
                        f"{self.experts_per_layer}"
                    )

    def moe_layer_indices(self, n_layers: int) -> list[int]:
        """The blocks (of ``n_layers``) that hold MoE layers."""
        return [i for i in range(n_layers) if self.is_moe_layer(i)]

    def layer_for(self, index: int, n_layers: int) -> MoEConfig | None:
        """The MoE layer of block ``index`` (``None`` for a dense block), with its own expert
        count when ``experts_per_layer`` gives one."""
        if not self.is_moe_layer(index) or self.layer is None:
            return None
        position = self.moe_layer_indices(n_layers).index(index)
        layer = self.layer
        if position < self.hash_layers and self.hash_router is not None:
            layer = dataclasses.replace(layer, router=self.hash_router)
        if self.experts_per_layer is None:
            return layer
        return dataclasses.replace(layer, num_experts=self.experts_per_layer[position])

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer (0: a dense model)."""
        return 0 if self.layer is None else self.layer.num_experts

    def is_moe_layer(self, index: int) -> bool:
        """Whether block ``index`` holds an MoE layer."""
        if self.layers is not None:
            return self.layer is not None and index in self.layers
        return (
            self.layer is not None and index >= self.first_dense and (index + 1) % self.every == 0
        )


def drop_layer_d_model(moe: Any, d_model: Any, section: str = "moe") -> Any:
    """The ``moe`` section of a model config dict without ``layer.d_model``, which files written
    before ``MoEConfig.build(*, d_model)`` carry: the layer is built at the model's width, so
    the key must equal the model's ``d_model`` (else a ``ConfigError`` naming both)."""
    if not isinstance(moe, dict) or not isinstance(moe.get("layer"), dict):
        return moe
    layer = dict(moe["layer"])
    width = layer.pop("d_model", None)
    if width not in (None, 0, d_model):
        raise ConfigError(
            f"{section}.layer.d_model={width} differs from the model's d_model={d_model}; the MoE "
            "layer is built at the model's width: leave the key out"
        )
    return {**moe, "layer": layer}
