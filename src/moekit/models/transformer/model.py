"""Decoder-only MoE transformer language model.

Legend: B = batch, S = sequence positions, D = d_model, V = vocabulary.

``TransformerLM.forward`` reaches the experts in four calls: model -> block -> MoE layer ->
dispatcher -> expert bank, whose one fused autograd function runs both grouped matmuls. Each
block is pre-norm (RMSNorm): ``x + attn(norm(x))``, then ``x + ffn(norm(x))`` where the FFN is
an MoE layer or a dense FFN (``MoEPlacementConfig``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from moekit.dispatch.config import DispatchMode, DropPriority
from moekit.experts.activations import Activation
from moekit.layers import MoEOutput
from moekit.models.common.attention import AttentionConfig, KVCache
from moekit.models.common.attention_base import AttentionMixerConfig
from moekit.models.common.block import (
    Block,
    LMOutput,
    NormKind,
    NormPosition,
    build_norm,
    check_token_range,
)
from moekit.models.common.cache import Start, new_positions
from moekit.models.common.layout import NONE as NONE_MIXER
from moekit.models.common.layout import AnyAttentionConfig, TokenMixerConfig, TokenMixerLayout
from moekit.models.common.legacy import upgrade_model_dict
from moekit.models.common.placement import MoEPlacementConfig, drop_layer_d_model
from moekit.models.common.rotary import rotary_tables
from moekit.routing import RandomStaticRouterConfig, TokenTableRouterConfig, is_causal
from moekit.utils.validation import check_fields


@dataclass(kw_only=True)
class TransformerConfig:
    """A pre-norm decoder-only transformer whose FFNs may be MoE layers.

    Args:
        vocab_size: tokens in the vocabulary.
        d_model: model width.
        n_layers: blocks.
        attention: every attention block's mixer: softmax attention (``AttentionConfig``),
            latent attention (``MLAConfig``) or a mixture of attention heads (``MoAConfig``);
            ``token_mixers`` gives blocks other mixers (their own attention, a recurrent one).
        ffn_hidden: hidden width of the dense FFNs.
        activation: FFN and expert activation.
        max_seq_len: longest sequence (rotary table size, cache size).
        norm_eps: RMSNorm epsilon (and the attention's query/key norms', unless it sets one).
        tie_embeddings: the output head reuses the token embedding.
        moe: where the MoE layers are and how they are built.
        embedding_multiplier: scales the token embeddings (Granite's muP-style multipliers).
        residual_multiplier: scales each block's attention and FFN outputs before they join
            the residual stream (Granite).
        logits_scaling: the logits are divided by this (Granite).
        norm: ``rms`` (RMSNorm) or ``layer`` (LayerNorm with a bias, Phi-3.5-MoE) for the
            blocks' and the final norm.
        lm_head_bias: the output head has a bias (Phi-3.5-MoE; not with tied embeddings).
        norm_position: ``pre`` (``x + f(norm(x))``) or ``post`` (``x + norm(f(x))``, OLMo-2 /
            FlexOlmo) blocks; the final norm is there either way.
        token_mixers: which token mixer each block runs (``TokenMixerLayout``: attention or a
            recurrent mixer such as Gated DeltaNet, Mamba2 or a short convolution); ``None``:
            attention everywhere.
        layer_scalars: each block's output (the whole residual stream) is multiplied by a
            stored per-block scalar (Gemma 4's ``layer_scalar``, a buffer, not trained).
        logit_softcap: logits become ``cap · tanh(logits / cap)`` (Gemma); 0: off.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    attention: AnyAttentionConfig
    ffn_hidden: int
    activation: Activation = Activation.SWIGLU
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    moe: MoEPlacementConfig = field(default_factory=MoEPlacementConfig)
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    norm: NormKind = NormKind.RMS
    lm_head_bias: bool = False
    norm_position: NormPosition = NormPosition.PRE
    token_mixers: TokenMixerLayout | None = None
    layer_scalars: bool = False
    logit_softcap: float = 0.0

    #: keys of the flat layout, named by their new home in the error for an old config file
    moved_keys: ClassVar[dict[str, str]] = {
        **{
            name: f"attention.{name}"
            for name in (
                "n_heads",
                "n_kv_heads",
                "head_dim",
                "rope_theta",
                "rope_scaling",
                "qkv_bias",
                "qk_norm",
                "o_bias",
                "sliding_window",
                "sliding_window_every",
                "mla",
            )
        },
        "attention_sinks": "attention.sinks",
    }

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("vocab_size", "d_model", "n_layers", "ffn_hidden", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lm_head_bias and self.tie_embeddings:
            raise ValueError("lm_head_bias needs an untied head (tie_embeddings=false)")
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap must be >= 0 (0: off), got {self.logit_softcap}")
        if not self.attention.causal:
            raise ValueError("attention.causal must be true in a causal language model")
        if not isinstance(self.attention, AnyAttentionConfig):
            raise ValueError(
                "attention must be an attention mixer config (AttentionConfig, MLAConfig or "
                f"MoAConfig), got {type(self.attention).__name__}"
            )
        self.attention = self.attention.resolved(d_model=self.d_model)
        self._resolve_attention_variants()
        placed = self.moe.layers
        if placed and placed[-1] >= self.n_layers:
            raise ValueError(f"moe.layers names blocks beyond the model's {self.n_layers}")
        layer = self.moe.layer
        if layer is None:
            return
        counts = self.moe.experts_per_layer
        if counts is not None and len(counts) != len(self.moe.moe_layer_indices(self.n_layers)):
            raise ValueError(
                f"moe.experts_per_layer has {len(counts)} entries for "
                f"{len(self.moe.moe_layer_indices(self.n_layers))} MoE layers"
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
        for router in (layer.router, self.moe.hash_router):
            if (
                isinstance(router, RandomStaticRouterConfig | TokenTableRouterConfig)
                and router.vocab_size != self.vocab_size
            ):
                raise ValueError("the routers' vocab_size must equal the model's vocab_size")

    def _resolve_attention_variants(self) -> None:
        """The layout's own attention configs get their defaults filled in as ``attention``."""
        layout = self.token_mixers
        if layout is None:
            return
        mixers = dict(layout.mixers)
        for name, mixer in layout.mixers.items():
            if isinstance(mixer, AttentionMixerConfig) and not isinstance(
                mixer, AnyAttentionConfig
            ):
                raise ValueError(
                    f"token_mixers.mixers.{name}: kind={mixer.kind!r} needs its model's "
                    "positions (T5 attention is the encoder-decoder's); a decoder block takes "
                    "attention, mla, moa or a recurrent mixer"
                )
            if isinstance(mixer, AnyAttentionConfig):
                if not mixer.causal:
                    raise ValueError(f"token_mixers.mixers.{name}.causal must be true")
                mixers[name] = mixer.resolved(d_model=self.d_model)
        self.token_mixers = dataclasses.replace(layout, mixers=mixers)

    @classmethod
    def prepare_config_dict(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A file from before attention's layer options moved to ``token_mixers``, or with the
        MoE layer's width (``moe.layer.d_model``, now the model's), is read as it meant."""
        data = upgrade_model_dict(data)
        if "moe" not in data:
            return data
        return {**data, "moe": drop_layer_d_model(data["moe"], data.get("d_model"))}

    def build(self) -> TransformerLM:
        """The ``TransformerLM`` of this config (randomly initialised)."""
        return TransformerLM(self)

    def attention_of_layer(self, index: int) -> AnyAttentionConfig:
        """Block ``index``'s attention config: its own (``token_mixers``) or the model's."""
        layout = self.token_mixers
        variant = None if layout is None else layout.attention_variant_of_layer(index)
        return self.attention if variant is None else variant

    def token_mixer_of_layer(self, index: int) -> TokenMixerConfig | None:
        """Block ``index``'s token mixer: its attention config, a recurrent mixer's, or
        ``None`` (a block without one)."""
        if self.token_mixers is None:
            return self.attention
        if self.token_mixers.name_of_layer(index) == NONE_MIXER:
            return None
        recurrent = self.token_mixers.mixer_of_layer(index)
        return self.attention_of_layer(index) if recurrent is None else recurrent

    def is_attention_layer(self, index: int) -> bool:
        """Whether block ``index``'s token mixer is softmax attention (the model's
        ``attention`` or a layout's own attention config)."""
        return self.token_mixers is None or self.token_mixers.is_attention(index)

    def has_channel_mixer(self, index: int) -> bool:
        """Whether block ``index`` has its FFN or MoE sublayer (``token_mixers.channel``)."""
        return self.token_mixers is None or self.token_mixers.has_channel_mixer(index)

    @property
    def kv_heads(self) -> int:
        """Key/value heads (``attention.n_kv_heads`` after defaults are resolved)."""
        return self.attention.kv_heads

    @property
    def head_width(self) -> int:
        """Per-head width (``attention.head_dim`` after defaults are resolved)."""
        return self.attention.head_width(self.d_model)

    @property
    def is_moe(self) -> bool:
        return self.moe.num_experts > 0

    def window_of_layer(self, index: int) -> int:
        """The sliding window of block ``index`` (0 for full attention)."""
        mixer = self.token_mixer_of_layer(index)
        return mixer.sliding_window if isinstance(mixer, AttentionConfig) else 0


class TransformerLM(nn.Module):
    """``tokens (B, S) -> LMOutput`` with logits ``(B, S, V)``; see ``TransformerConfig``."""

    model_type = "moekit_transformer_lm"
    #: the ``LoRAConfig`` of attached adapters (``moekit.adapters``), saved with the weights
    lora_config: Any = None

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            Block(
                config.token_mixer_of_layer(i),
                d_model=config.d_model,
                ffn_hidden=config.ffn_hidden,
                activation=config.activation,
                norm_eps=config.norm_eps,
                moe_config=config.moe.layer_for(i, config.n_layers),
                residual_multiplier=config.residual_multiplier,
                norm=config.norm,
                norm_position=config.norm_position,
                channel=config.has_channel_mixer(i),
                dense_beside=config.moe.dense_beside,
                layer_scalar=config.layer_scalars,
            )
            for i in range(config.n_layers)
        )
        self.norm = build_norm(config.norm, config.d_model, config.norm_eps)
        self.lm_head = (
            None
            if config.tie_embeddings
            else nn.Linear(config.d_model, config.vocab_size, bias=config.lm_head_bias)
        )
        # one rotary table per distinct rotation among the attention blocks (a layout's own
        # attention configs may rotate otherwise: Gemma 4's global layers); -1: no positions
        specs: list[tuple[Any, ...]] = []
        self.rope_table_of_block: list[int] = []
        for mixer in [config.attention, *map(config.token_mixer_of_layer, range(config.n_layers))]:
            spec = self._rotation(mixer)
            if spec is not None and spec not in specs:
                specs.append(spec)
            self.rope_table_of_block.append(-1 if spec is None else specs.index(spec))
        del self.rope_table_of_block[0]  # the model's attention, listed first for table 0
        self.rope_specs = specs
        for j in range(len(specs)):
            suffix = "" if j == 0 else f"_{j}"
            self.register_buffer(f"rope_cos{suffix}", torch.empty(0), persistent=False)
            self.register_buffer(f"rope_sin{suffix}", torch.empty(0), persistent=False)
        self.init_buffers()
        nn.init.normal_(self.embed.weight, std=0.02)

    def _rotation(self, mixer: TokenMixerConfig | None) -> tuple[Any, ...] | None:
        """What a rotary table depends on: ``(rotated width, base, scaling)``; ``None`` for a
        mixer without rotary positions."""
        if not isinstance(mixer, AnyAttentionConfig) or mixer.rope is None:
            return None
        rotated = mixer.rotary_dim(self.config.d_model)
        return (rotated, mixer.rope.theta, mixer.rope.scaling)

    def init_buffers(self) -> None:
        """(Re)compute the buffers that are not saved (the rotary tables) on the embedding's
        device: after building on the meta device and ``to_empty``, as torchtitan does."""
        device = self.embed.weight.device
        for j, (rope_dim, theta, scaling) in enumerate(self.rope_specs):
            cos, sin = rotary_tables(rope_dim, self.config.max_seq_len, theta, scaling)
            suffix = "" if j == 0 else f"_{j}"
            setattr(self, f"rope_cos{suffix}", cos.to(device))
            setattr(self, f"rope_sin{suffix}", sin.to(device))

    def _rotary(
        self, start: Start, S: int, positions_BS: torch.Tensor | None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each rotary table's ``(cos, sin)`` for the new positions: ``(S, Dr)`` rows from
        ``start``, or ``(B, 1, S, Dr)`` at each sequence's own ``positions_BS``."""
        out = []
        for j in range(len(self.rope_specs)):
            suffix = "" if j == 0 else f"_{j}"
            cos, sin = getattr(self, f"rope_cos{suffix}"), getattr(self, f"rope_sin{suffix}")
            if positions_BS is None:
                assert isinstance(start, int)  # a fixed-shape cache always has positions_BS
                out.append((cos.narrow(0, start, S), sin.narrow(0, start, S)))
            else:
                out.append(
                    (
                        F.embedding(positions_BS, cos).unsqueeze(1),
                        F.embedding(positions_BS, sin).unsqueeze(1),
                    )
                )
        return out

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> LMOutput:
        """Args:
        tokens: ``(B, S)`` token ids.
        attention_mask: ``(B, S)`` (or ``(B, cached + S)``, as Hugging Face passes it) bool or
            0/1, ``True`` for real tokens; left or right padding. Padding keys are hidden from
            attention, padding is kept out of the MoE dispatch, losses and statistics, and
            each sequence's real tokens take positions 0, 1, 2, ... With a ``kv_cache`` the
            mask of earlier calls is kept in the cache.
        kv_cache: continue from the cached positions and append these (generation).
        segment_ids: ``(B, S)`` integers for packed sequences (several documents per row):
            a token attends only to earlier tokens of its own segment, positions restart at 0
            in each segment, and segment 0 is padding (not attended to, not routed). Not with
            ``attention_mask`` or ``kv_cache``.
        """
        if segment_ids is not None:
            return self._forward_packed(tokens, segment_ids, attention_mask, kv_cache)
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"tokens must be a (batch, seq) integer tensor, got {tuple(tokens.shape)} "
                f"{tokens.dtype}"
            )
        B, S = tokens.shape
        start = self._start(kv_cache, S)
        check_token_range(tokens, self.config.vocab_size)
        key_mask = self._key_mask(attention_mask, B, S, start, kv_cache)
        positions_BS = new_mask = None
        if key_mask is not None:  # each sequence counts positions over its real tokens only
            slots = new_positions(start, S, key_mask.device)
            positions_BS = (key_mask.long().cumsum(dim=1) - 1).clamp(min=0).index_select(1, slots)
            new_mask = key_mask.index_select(1, slots)
        rope = self._rotary(start, S, positions_BS)
        return self._run_blocks(tokens, rope, key_mask, new_mask, kv_cache, start)

    def _run_blocks(
        self,
        tokens: torch.Tensor,
        rope: list[tuple[torch.Tensor, torch.Tensor]],
        key_mask: torch.Tensor | None,
        new_mask: torch.Tensor | None,
        kv_cache: KVCache | None,
        start: Start,
        segment_ids: torch.Tensor | None = None,
    ) -> LMOutput:
        x = self.embed(tokens)
        if self.config.embedding_multiplier != 1.0:
            x = x * self.config.embedding_multiplier
        aux_loss = x.new_zeros((), dtype=torch.float32)
        moe_outputs: list[MoEOutput] = []
        for i, block in enumerate(self.blocks):
            cache = None if kv_cache is None else (kv_cache.keys[i], kv_cache.values[i])
            table = self.rope_table_of_block[i]
            x, moe_out, mixer_loss = block(
                x,
                rope=None if table < 0 else rope[table],
                cache=cache,
                start=start,
                key_mask=key_mask,
                padding_mask=new_mask,
                token_ids=tokens,
                segment_ids=segment_ids,
            )
            if moe_out is not None:
                moe_outputs.append(moe_out)
                aux_loss = aux_loss + moe_out.aux_loss
            if mixer_loss is not None:  # a mixture of attention heads' router
                aux_loss = aux_loss + mixer_loss
        if kv_cache is not None and isinstance(start, int):
            kv_cache.length = start + tokens.shape[1]
        elif kv_cache is not None and kv_cache.slot is not None:  # on the device, in place
            kv_cache.slot.add_(tokens.shape[1])
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        if self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling
        if self.config.logit_softcap:
            cap = self.config.logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return LMOutput(logits=logits, aux_loss=aux_loss, moe_outputs=moe_outputs)

    def _forward_packed(
        self,
        tokens: torch.Tensor,
        segment_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kv_cache: KVCache | None,
    ) -> LMOutput:
        if attention_mask is not None or kv_cache is not None:
            raise ValueError("segment_ids cannot be combined with attention_mask or kv_cache")
        if segment_ids.shape != tokens.shape or segment_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"segment_ids must be integers of the tokens' shape {tuple(tokens.shape)}, got "
                f"{tuple(segment_ids.shape)} {segment_ids.dtype}"
            )
        seq_len = tokens.shape[1]
        same_BSS = (segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)) & (
            segment_ids.unsqueeze(1) != 0
        )
        index_S = torch.arange(seq_len, device=tokens.device)
        first = torch.ones_like(segment_ids, dtype=torch.bool)
        first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        segment_start_BS = torch.where(first, index_S, 0).cummax(dim=1).values
        check_token_range(tokens, self.config.vocab_size)
        if seq_len > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {seq_len} positions exceeds max_seq_len={self.config.max_seq_len}"
            )
        rope = self._rotary(0, seq_len, index_S - segment_start_BS)
        return self._run_blocks(
            tokens, rope, same_BSS.unsqueeze(1), segment_ids != 0, None, 0, segment_ids
        )

    def _start(self, kv_cache: KVCache | None, S: int) -> Start:
        """The slot of the first new token: the cache's device ``slot`` for fixed-shape
        decoding (its length is the caller's to check), else the host ``length``, checked."""
        if kv_cache is not None and kv_cache.slot is not None:
            return kv_cache.slot
        start = 0 if kv_cache is None else kv_cache.length
        limit = self.config.max_seq_len if kv_cache is None else kv_cache.max_len
        if start + S > min(limit, self.config.max_seq_len):
            raise ValueError(
                f"sequence of {start + S} positions exceeds max_seq_len={self.config.max_seq_len}"
                + ("" if kv_cache is None else f" or the cache length {kv_cache.max_len}")
            )
        return start

    @staticmethod
    def _key_mask(
        mask: torch.Tensor | None, B: int, S: int, start: Start, kv_cache: KVCache | None
    ) -> torch.Tensor | None:
        """The ``(B, start + S)`` bool mask of real tokens so far (``(B, max_len)`` with a
        fixed-shape cache), or ``None`` (no padding)."""
        cached = None if kv_cache is None else kv_cache.key_mask
        if mask is None and cached is None:
            return None
        if mask is None:
            mask = torch.ones(B, S, dtype=torch.bool, device=cached.device)  # type: ignore[union-attr]
        if mask.dtype not in (torch.bool, torch.int64, torch.int32, torch.uint8):
            raise TypeError(f"attention_mask must be bool or 0/1 integers, got {mask.dtype}")
        widths = (S,) if not isinstance(start, int) else (S, start + S)
        if mask.dim() != 2 or mask.shape[0] != B or mask.shape[1] not in widths:
            raise ValueError(
                f"attention_mask must have shape (batch={B}, {S}) or (batch={B}, cached + new="
                f"{start + S}), got {tuple(mask.shape)}"
            )
        mask = mask.bool()
        if kv_cache is None:
            return mask
        if kv_cache.key_mask is None:
            kv_cache.key_mask = torch.ones(
                B, kv_cache.max_len, dtype=torch.bool, device=mask.device
            )
        # the mask covers either the new or all positions
        positions = new_positions(start + S - mask.shape[1], mask.shape[1], mask.device)
        kv_cache.key_mask.index_copy_(1, positions, mask)
        if not isinstance(start, int):
            return kv_cache.key_mask
        return kv_cache.key_mask.narrow(1, 0, start + S)

    def new_kv_cache(
        self,
        batch: int,
        max_len: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        fixed_shapes: bool = False,
    ) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``max_len`` positions (default
        ``max_seq_len``); ``dtype`` defaults to the parameters' (``torch.bfloat16`` halves an
        fp32 model's cache, and under autocast saves re-casting it every step).
        ``fixed_shapes``: the next slot is kept on the device (``KVCache.slot``) and attention
        reads every slot under a mask, so each decoding step has the same shapes and reads
        nothing on the host (``torch.compile`` / CUDA graphs); the caller keeps within
        ``max_len``."""
        stateless = [
            n for n, m in self.named_modules() if not getattr(m, "decodes_with_cache", True)
        ]
        if stateless:
            raise ValueError(
                f"{stateless[0]} ({type(self.get_submodule(stateless[0])).__name__}) keeps no "
                "decoding state for a KV cache: decode with generate(..., use_cache=False)"
            )
        length = max_len or self.config.max_seq_len
        cache = KVCache.for_layers(
            [
                ((batch, 0), (batch, 0))  # a block without a token mixer keeps no state
                if cast(Any, block).attn is None
                else cast(Any, block).attn.cache_shapes(batch, length)
                for block in self.blocks
            ],
            dtype=dtype or self.embed.weight.dtype,
            device=self.embed.weight.device,
            max_len=length,
        )
        if fixed_shapes:
            device = self.embed.weight.device
            cache.slot = torch.zeros((), dtype=torch.long, device=device)
            cache.key_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        return cache
