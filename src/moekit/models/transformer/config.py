"""Configuration of the decoder-only MoE transformer (and of its dense twin)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moekit.dispatch.config import DispatchMode, DropPriority
from moekit.experts.activations import Activation
from moekit.layers import MoEConfig
from moekit.models.transformer.attention import QKNorm
from moekit.models.transformer.mla import MLAConfig
from moekit.routing.config import RandomStaticRouterConfig
from moekit.routing.registry import is_causal
from moekit.utils.validation import check_fields

if TYPE_CHECKING:
    from moekit.models.transformer.model import TransformerLM


@dataclass(kw_only=True)
class MoEPlacementConfig:
    """Which FFNs of a model are MoE layers, and the MoE layer each of them becomes.

    Args:
        layer: the MoE layer of every MoE block; its ``d_model`` must be the model's. ``None``
            makes every FFN dense (the baseline). In a causal LM its dispatch must be dropless
            or capacity with ``drop_priority='token'`` (the only order in which no token's
            capacity depends on later tokens).
        every: an MoE layer in every n-th block (layer ``i`` is MoE when ``(i + 1) % every == 0``).
        first_dense: the first n blocks always use a dense FFN (DeepSeek).
        experts_per_layer: routed experts of each MoE block, in order, where they differ from
            ``layer.num_experts`` (after pruning or merging); ``None``: all the same.

    In config files ``layer.d_model`` follows the model's ``d_model`` and may be left out; the
    flat keys of moekit <= 0.3 (``num_experts``, ``top_k``, ``expert_hidden``, ``router``, ...
    directly under ``moe``) are still read, see :func:`upgrade_moe_section`.
    """

    layer: MoEConfig | None = None
    every: int = 1
    first_dense: int = 0
    experts_per_layer: list[int] | None = None

    def __post_init__(self) -> None:
        check_fields(self)
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
        if self.experts_per_layer is None:
            return self.layer
        position = self.moe_layer_indices(n_layers).index(index)
        return dataclasses.replace(self.layer, num_experts=self.experts_per_layer[position])

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer (0: a dense model)."""
        return 0 if self.layer is None else self.layer.num_experts

    def is_moe_layer(self, index: int) -> bool:
        """Whether block ``index`` holds an MoE layer."""
        return (
            self.layer is not None and index >= self.first_dense and (index + 1) % self.every == 0
        )


#: The keys of the flat ``moe`` section of moekit <= 0.3, now fields of ``moe.layer``.
LEGACY_MOE_KEYS = (
    "num_experts",
    "top_k",
    "expert_hidden",
    "expert_bias",
    "router",
    "dispatch",
    "shared_experts",
    "aux_loss",
    "statistics",
)


def upgrade_moe_section(moe: Any, d_model: Any, activation: Any) -> Any:
    """The ``moe`` section of a model config dict in today's nested form.

    Flat keys (``moe.num_experts=8``, ``moe.expert_hidden=...``, as older run folders and
    ``--set model.moe.top_k=1`` write them) are moved into ``moe.layer`` (``expert_hidden`` and
    ``expert_bias`` into ``moe.layer.experts``, whose activation defaults to the model's), on top
    of whatever ``moe.layer`` already holds; ``num_experts=0`` means a dense model. The layer's
    ``d_model`` is set to the model's.
    """
    if not isinstance(moe, dict):
        return moe
    moe = dict(moe)
    flat = {key: moe.pop(key) for key in LEGACY_MOE_KEYS if key in moe}
    layer = moe.get("layer")
    if flat:
        layer = dict(layer) if isinstance(layer, dict) else {"top_k": 2}
        experts = dict(layer.get("experts") or {})
        if "expert_hidden" in flat:
            experts["hidden"] = flat.pop("expert_hidden")
        if "expert_bias" in flat:
            experts["bias"] = flat.pop("expert_bias")
        experts.setdefault("activation", activation)
        layer["experts"] = experts
        layer.update(flat)
        if layer.get("num_experts", 0) == 0:
            layer = None
    if isinstance(layer, dict):
        layer = {**layer, "d_model": d_model}
    moe["layer"] = layer
    return moe


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


@dataclass(kw_only=True)
class TransformerConfig:
    """A pre-norm decoder-only transformer whose FFNs may be MoE layers.

    Args:
        vocab_size: tokens in the vocabulary.
        d_model: model width.
        n_layers: blocks.
        n_heads: query heads.
        n_kv_heads: key/value heads (grouped-query attention); ``None`` means ``n_heads``.
        head_dim: per-head width; ``None`` means ``d_model // n_heads``.
        ffn_hidden: hidden width of the dense FFNs.
        activation: FFN and expert activation.
        max_seq_len: longest sequence (rotary table size, cache size).
        rope_theta: rotary base.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: the output head reuses the token embedding.
        qkv_bias: biases on the query, key and value projections (Qwen2).
        qk_norm: RMSNorm on queries and keys before RoPE: ``none``, ``head`` (per head, Qwen3)
            or ``full`` (over the whole projection, OLMoE).
        rope_scaling: YaRN scaling of the rotary positions, or ``None``.
        o_bias: a bias on the attention output projection (GPT-OSS).
        attention_sinks: a learned per-head sink logit in every softmax (GPT-OSS).
        sliding_window: window of the sliding-window layers (0: none).
        sliding_window_every: layer ``i`` uses the window when ``i % every == 0`` (GPT-OSS: 2,
            i.e. every even layer; 1: every layer).
        mla: multi-head latent attention (DeepSeek) instead of grouped-query attention.
        moe: where the MoE layers are and how they are built.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_hidden: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    activation: Activation = Activation.SWIGLU
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: QKNorm = QKNorm.NONE
    rope_scaling: RopeScalingConfig | None = None
    o_bias: bool = False
    attention_sinks: bool = False
    sliding_window: int = 0
    sliding_window_every: int = 1
    mla: MLAConfig | None = None
    moe: MoEPlacementConfig = field(default_factory=MoEPlacementConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
                    "(or set head_dim)"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary positions, got {self.head_dim}")
        if self.mla is not None and (self.qkv_bias or self.qk_norm != "none"):
            raise ValueError("mla attention has no qkv_bias or qk_norm options")
        layer = self.moe.layer
        if layer is None:
            return
        counts = self.moe.experts_per_layer
        if counts is not None and len(counts) != len(self.moe.moe_layer_indices(self.n_layers)):
            raise ValueError(
                f"moe.experts_per_layer has {len(counts)} entries for "
                f"{len(self.moe.moe_layer_indices(self.n_layers))} MoE layers"
            )
        if layer.d_model != self.d_model:
            raise ValueError(
                f"moe.layer.d_model={layer.d_model} must equal the model's d_model={self.d_model}"
            )
        dispatch = layer.dispatch
        if (
            dispatch.mode is DispatchMode.CAPACITY
            and dispatch.drop_priority is not DropPriority.TOKEN
        ):
            raise ValueError(
                f"moe.layer.dispatch.drop_priority={dispatch.drop_priority.value!r} is not causal: "
                "a later token could take an earlier token's capacity. Use drop_priority='token' "
                "or mode='dropless' in a causal language model."
            )
        if not is_causal(layer.router.kind):
            raise ValueError(
                f"moe.layer.router.kind={layer.router.kind.value!r} is not causal (a token's "
                "routing depends on later tokens of the batch), so a causal language model "
                "cannot use it; see docs/routing.md for the causal routers"
            )
        router = layer.router
        if isinstance(router, RandomStaticRouterConfig) and router.vocab_size != self.vocab_size:
            raise ValueError("moe.layer.router.vocab_size must equal the model's vocab_size")

    @classmethod
    def upgrade_config_dict(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Read older config dicts: see :func:`upgrade_moe_section`."""
        if "moe" not in data:
            return data
        activation = data.get("activation", Activation.SWIGLU.value)
        return {**data, "moe": upgrade_moe_section(data["moe"], data.get("d_model"), activation)}

    def build(self) -> TransformerLM:
        """The ``TransformerLM`` of this config (randomly initialised)."""
        from moekit.models.transformer.model import TransformerLM

        return TransformerLM(self)

    @property
    def kv_heads(self) -> int:
        """Key/value heads (``n_kv_heads`` after defaults are resolved)."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_width(self) -> int:
        """Per-head width (``head_dim`` after defaults are resolved)."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.moe.num_experts > 0

    def window_of_layer(self, index: int) -> int:
        """The sliding window of block ``index`` (0 for full attention)."""
        return self.sliding_window if index % self.sliding_window_every == 0 else 0
