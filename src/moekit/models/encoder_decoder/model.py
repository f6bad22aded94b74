"""Encoder–decoder MoE transformer: T5 with Switch (or any moekit) MoE layers, the model of
the Switch Transformer (Fedus et al. 2021) and ST-MoE (Zoph et al. 2022).

Legend: B = batch, S = encoder positions, T = decoder positions, D = d_model, V = vocabulary.

Each stack is pre-norm with T5's RMS norm (no mean, no bias) and a relative position bias
computed once per stack and shared by its blocks. Encoder block: ``x + attn(norm(x))``, then
``x + ffn(norm(x))``. Decoder block: causal self-attention, attention over the encoder output,
then the FFN. An FFN is an MoE layer in the blocks ``encoder_moe`` / ``decoder_moe`` place
(``MoEPlacementConfig``: every n-th, or the blocks listed), else a dense FFN. With tied
embeddings the decoder output is scaled by ``D ** -0.5`` before the shared embedding (T5).

Training in ``moekit train`` uses T5's prefix language-modelling objective (Raffel et al. 2020,
section 3.3.2): the first half of each window is the encoder input and the decoder predicts the
second half (:meth:`EncoderDecoderLM.split_window`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from moekit.dispatch.config import DispatchMode, DropPriority
from moekit.experts.activations import Activation
from moekit.layers import MoEConfig, MoEOutput, serving
from moekit.models.common.block import Block, LMOutput, NormKind, build_norm, check_token_range
from moekit.models.common.placement import MoEPlacementConfig, drop_layer_d_model
from moekit.models.common.sampling import filter_logits, sample_tokens
from moekit.models.common.t5_attention import T5AttentionConfig, additive_mask
from moekit.models.encoder_decoder.relative_position import RelativePositionBias
from moekit.routing import is_causal
from moekit.utils.validation import check_fields


def _check_decoder_is_causal(layer: MoEConfig | None) -> None:
    """The decoder's MoE layers may not let a token's route or capacity depend on later
    tokens (what generation could not reproduce)."""
    if layer is None:
        return
    dispatch = layer.dispatch
    if dispatch.mode is DispatchMode.CAPACITY and dispatch.drop_priority is not DropPriority.TOKEN:
        raise ValueError(
            f"decoder_moe.layer.dispatch.drop_priority={dispatch.drop_priority.value!r} is not "
            "causal; use 'token' (or mode='dropless') in the decoder"
        )
    if not is_causal(layer.router.kind):
        raise ValueError(
            f"decoder_moe.layer.router.kind={layer.router.kind.value!r} is not causal, so the "
            "decoder cannot use it"
        )


@dataclass(kw_only=True)
class EncoderDecoderConfig:
    """A T5-style encoder–decoder whose FFNs may be MoE layers.

    Args:
        vocab_size: tokens (shared by encoder and decoder).
        d_model: model width.
        n_heads: attention heads.
        head_dim: width of each head (T5's ``d_kv``); ``None`` means ``d_model // n_heads``.
        ffn_hidden: hidden width of the dense FFNs.
        activation: dense FFN activation (T5 and Switch: ``relu``; T5.1.1: ``geglu``).
        n_encoder_layers, n_decoder_layers: blocks of each stack.
        relative_attention_buckets, relative_attention_max_distance: the position bias's
            buckets (T5: 32 and 128).
        norm_eps: the RMS norms' epsilon.
        tie_embeddings: the output head reuses the token embedding (its input scaled by
            ``d_model ** -0.5``).
        max_seq_len: longest decoder sequence (the generation cache) and encoder input.
        decoder_start_token_id: the token the decoder starts from (T5: the pad token, 0).
        encoder_moe, decoder_moe: where each stack's MoE layers are and how they are built.
    """

    vocab_size: int
    d_model: int
    n_heads: int
    head_dim: int | None = None
    ffn_hidden: int
    activation: Activation = Activation.RELU
    n_encoder_layers: int
    n_decoder_layers: int
    relative_attention_buckets: int = 32
    relative_attention_max_distance: int = 128
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    max_seq_len: int = 512
    decoder_start_token_id: int = 0
    encoder_moe: MoEPlacementConfig = field(default_factory=MoEPlacementConfig)
    decoder_moe: MoEPlacementConfig = field(default_factory=MoEPlacementConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        for name in (
            "vocab_size",
            "d_model",
            "n_heads",
            "ffn_hidden",
            "n_encoder_layers",
            "n_decoder_layers",
            "max_seq_len",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} (or set "
                    "head_dim)"
                )
            self.head_dim = self.d_model // self.n_heads
        if not 0 <= self.decoder_start_token_id < self.vocab_size:
            raise ValueError(
                f"decoder_start_token_id must be in [0, vocab_size={self.vocab_size}), got "
                f"{self.decoder_start_token_id}"
            )
        for name, layers in (
            ("encoder_moe", self.n_encoder_layers),
            ("decoder_moe", self.n_decoder_layers),
        ):
            placement: MoEPlacementConfig = getattr(self, name)
            layer = placement.layer
            if layer is None:
                continue
            if placement.layers and placement.layers[-1] >= layers:
                raise ValueError(f"{name}.layers names blocks beyond the {layers} of the stack")
        _check_decoder_is_causal(self.decoder_moe.layer)

    @classmethod
    def prepare_config_dict(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A file with each stack's MoE layer width (``moe.layer.d_model``, now the model's) is
        read as it meant."""
        out = dict(data)
        for name in ("encoder_moe", "decoder_moe"):
            if name in out:
                out[name] = drop_layer_d_model(out[name], data.get("d_model"), name)
        return out

    def build(self) -> EncoderDecoderLM:
        """The ``EncoderDecoderLM`` of this config (randomly initialised)."""
        return EncoderDecoderLM(self)

    @property
    def is_moe(self) -> bool:
        return self.encoder_moe.layer is not None or self.decoder_moe.layer is not None


def _block_parts(config: EncoderDecoderConfig, moe_config: MoEConfig | None) -> dict[str, Any]:
    """The common ``Block``'s arguments for a T5 block: pre-norm RMS norms, the dense FFN or
    the MoE layer."""
    return dict(
        d_model=config.d_model,
        ffn_hidden=config.ffn_hidden,
        activation=config.activation,
        norm_eps=config.norm_eps,
        moe_config=moe_config,
    )


class EncoderBlock(Block):
    """The common block with T5's bidirectional attention (its position bias from the stack),
    then the FFN (dense or MoE)."""

    def __init__(self, config: EncoderDecoderConfig, moe_config: MoEConfig | None) -> None:
        assert config.head_dim is not None
        attention = T5AttentionConfig(n_heads=config.n_heads, head_dim=config.head_dim)
        super().__init__(attention, **_block_parts(config, moe_config))
        self.keep_registration_order(["ffn_norm", "ffn", "attn_norm", "attn"])

    def forward(  # type: ignore[override]
        self,
        x_BSD: torch.Tensor,
        bias: torch.Tensor,
        padding_mask: torch.Tensor | None,
        token_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, MoEOutput | None]:
        attn, norm = cast(Any, self.attn), cast(nn.Module, self.attn_norm)
        x_BSD = x_BSD + attn(norm(x_BSD), bias)
        return self.mix_channels(x_BSD, padding_mask, token_ids)


class DecoderBlock(Block):
    """The common block with T5's causal self-attention, a third sublayer attending to the
    encoder output (cross-attention), then the FFN."""

    def __init__(self, config: EncoderDecoderConfig, moe_config: MoEConfig | None) -> None:
        assert config.head_dim is not None
        heads, width = config.n_heads, config.head_dim
        self_attention = T5AttentionConfig(n_heads=heads, head_dim=width, causal=True)
        super().__init__(self_attention, **_block_parts(config, moe_config))
        self.cross_norm = build_norm(NormKind.RMS, config.d_model, config.norm_eps)
        cross_attention = T5AttentionConfig(n_heads=heads, head_dim=width)
        self.cross_attn = cross_attention.build(d_model=config.d_model)
        order = ["ffn_norm", "ffn", "attn_norm", "attn", "cross_norm", "cross_attn"]
        self.keep_registration_order(order)

    def forward(  # type: ignore[override]
        self,
        x_BTD: torch.Tensor,
        bias: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        memory_bias: torch.Tensor,
        token_ids: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
    ) -> tuple[torch.Tensor, MoEOutput | None]:
        attn, norm = cast(Any, self.attn), cast(nn.Module, self.attn_norm)
        x_BTD = x_BTD + attn(norm(x_BTD), bias, cache=cache, start=start)
        x_BTD = x_BTD + self.cross_attn(self.cross_norm(x_BTD), memory_bias, keys_values=memory_kv)
        return self.mix_channels(x_BTD, None, token_ids)


class Stack(nn.Module):
    """The encoder or decoder: blocks, the shared relative position bias, a final norm."""

    def __init__(self, config: EncoderDecoderConfig, *, decoder: bool) -> None:
        super().__init__()
        placement = config.decoder_moe if decoder else config.encoder_moe
        n_layers = config.n_decoder_layers if decoder else config.n_encoder_layers
        block = DecoderBlock if decoder else EncoderBlock
        self.blocks = nn.ModuleList(
            block(config, placement.layer_for(i, n_layers)) for i in range(n_layers)
        )
        self.relative_bias = RelativePositionBias(
            n_heads=config.n_heads,
            num_buckets=config.relative_attention_buckets,
            max_distance=config.relative_attention_max_distance,
            bidirectional=not decoder,
        )
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)


@dataclass
class EncoderOutput:
    """The encoder's result: ``hidden`` ``(B, S, D)`` (after the final norm), its mask, and its
    MoE layers' auxiliary loss and outputs."""

    hidden: torch.Tensor
    attention_mask: torch.Tensor | None
    aux_loss: torch.Tensor
    moe_outputs: list[MoEOutput]


@dataclass
class Seq2SeqCache:
    """What decoding keeps between steps: the decoder's self-attention keys and values
    ``(B, H, max_len, Dh)`` per layer, the encoder output's keys and values per layer, and the
    positions written so far."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    memory_kv: list[tuple[torch.Tensor, torch.Tensor]]
    length: int = 0


class EncoderDecoderLM(nn.Module):
    """``(tokens (B, S), decoder_tokens (B, T)) -> LMOutput`` with logits ``(B, T, V)``; see
    ``EncoderDecoderConfig``."""

    model_type = "moekit_encoder_decoder"
    lora_config: Any = None

    def __init__(self, config: EncoderDecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, decoder=False)
        self.decoder = Stack(config, decoder=True)
        self.lm_head = (
            None
            if config.tie_embeddings
            else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )
        nn.init.normal_(self.embed.weight, std=1.0)  # T5's initialisation

    # --- the two stacks -------------------------------------------------------------------

    def encode(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> EncoderOutput:
        """Run the encoder on ``tokens`` ``(B, S)``; ``attention_mask`` ``(B, S)`` (``True`` /
        1 for real tokens) hides padding keys and keeps padding out of the MoE dispatch."""
        _check_tokens(tokens, "tokens", self.config)
        B, S = tokens.shape
        mask = None if attention_mask is None else _check_mask(attention_mask, B, S)
        x = self.embed(tokens)
        bias = self.encoder.relative_bias(S, S)
        if mask is not None:
            bias = bias + additive_mask(mask.view(B, 1, 1, S), bias.dtype)
        aux = x.new_zeros((), dtype=torch.float32)
        outputs: list[MoEOutput] = []
        for block in self.encoder.blocks:
            x, moe_out = block(x, bias, mask, tokens)
            if moe_out is not None:
                outputs.append(moe_out)
                aux = aux + moe_out.aux_loss
        return EncoderOutput(self.encoder.norm(x), mask, aux, outputs)

    def decode(
        self,
        decoder_tokens: torch.Tensor,
        encoded: EncoderOutput,
        cache: Seq2SeqCache | None = None,
    ) -> LMOutput:
        """The decoder's logits ``(B, T, V)`` for ``decoder_tokens`` (which start with
        ``decoder_start_token_id``) given the encoder output; with a ``cache`` the tokens
        continue the cached positions."""
        _check_tokens(decoder_tokens, "decoder_tokens", self.config)
        B, T = decoder_tokens.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.max_seq_len:
            raise ValueError(
                f"decoder sequence of {start + T} positions exceeds max_seq_len="
                f"{self.config.max_seq_len}"
            )
        x = self.embed(decoder_tokens)
        L = start + T
        bias = self.decoder.relative_bias(T, L, start)
        query_T1 = torch.arange(start, L, device=x.device).unsqueeze(1)
        causal_TL = torch.arange(L, device=x.device).unsqueeze(0) <= query_T1
        bias = bias + additive_mask(causal_TL, bias.dtype)
        memory = encoded.hidden
        S = memory.shape[1]
        memory_bias = torch.zeros(1, 1, 1, S, dtype=x.dtype, device=x.device)
        if encoded.attention_mask is not None:
            memory_bias = additive_mask(encoded.attention_mask.view(B, 1, 1, S), x.dtype)
        aux = x.new_zeros((), dtype=torch.float32)
        outputs: list[MoEOutput] = []
        for i, decoder_block in enumerate(self.decoder.blocks):
            block = cast(DecoderBlock, decoder_block)
            if cache is None:
                memory_kv = block.cross_attn.keys_values(memory)
                layer_cache = None
            else:
                if len(cache.memory_kv) <= i:
                    cache.memory_kv.append(block.cross_attn.keys_values(memory))
                memory_kv, layer_cache = cache.memory_kv[i], (cache.keys[i], cache.values[i])
            x, moe_out = block(
                x, bias, memory_kv, memory_bias, decoder_tokens, cache=layer_cache, start=start
            )
            if moe_out is not None:
                outputs.append(moe_out)
                aux = aux + moe_out.aux_loss
        if cache is not None:
            cache.length = L
        x = self.decoder.norm(x)
        if self.lm_head is None:
            logits = F.linear(x * self.config.d_model**-0.5, self.embed.weight)
        else:
            logits = self.lm_head(x)
        return LMOutput(logits=logits, aux_loss=aux, moe_outputs=outputs)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        decoder_tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> LMOutput:
        """Encode ``tokens`` ``(B, S)`` and decode ``decoder_tokens`` ``(B, T)`` (teacher
        forcing); the auxiliary loss and MoE outputs cover both stacks (encoder first)."""
        encoded = self.encode(tokens, attention_mask)
        out = self.decode(decoder_tokens, encoded)
        return LMOutput(
            logits=out.logits,
            aux_loss=encoded.aux_loss + out.aux_loss,
            moe_outputs=encoded.moe_outputs + out.moe_outputs,
        )

    # --- training and generation helpers ---------------------------------------------------

    def shift_right(self, targets: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
        """Decoder inputs for ``targets`` ``(B, T)``: the start token, then the targets but the
        last (ignored targets, -100, become ``pad_id``)."""
        inputs = targets.new_full(targets.shape, self.config.decoder_start_token_id)
        inputs[:, 1:] = targets[:, :-1]
        return inputs.masked_fill(inputs < 0, pad_id)

    def split_window(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A language-model window as a prefix-LM example: ``x`` ``(B, S)`` are the tokens and
        ``y`` the next tokens; the encoder reads ``x[:, :S//2]`` and the decoder predicts the
        rest, ``y[:, S//2-1:]``. Returns ``(encoder tokens, decoder tokens, targets)``."""
        S = x.shape[1]
        if S < 2:
            raise ValueError(f"an encoder–decoder needs windows of >= 2 tokens, got {S}")
        half = S // 2
        targets = y[:, half - 1 :]
        return x[:, :half], self.shift_right(targets), targets

    def forward_window(self, tokens: torch.Tensor) -> LMOutput:
        """The model on a window of text ``(B, S)`` split as in training (its first half in,
        the rest out; :meth:`split_window`): what ``moekit inspect`` and routing counts run."""
        source, decoder_tokens, _ = self.split_window(tokens[:, :-1], tokens[:, 1:])
        return self(source, decoder_tokens=decoder_tokens)

    def new_cache(
        self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None
    ) -> Seq2SeqCache:
        """An empty decoding cache for ``batch`` sequences of up to ``max_len`` positions."""
        length = max_len or self.config.max_seq_len
        assert self.config.head_dim is not None
        shape = (batch, self.config.n_heads, length, self.config.head_dim)
        dtype = dtype or self.embed.weight.dtype
        device = self.embed.weight.device
        n = self.config.n_decoder_layers
        return Seq2SeqCache(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
            memory_kv=[],
        )


def _check_tokens(tokens: torch.Tensor, name: str, config: EncoderDecoderConfig) -> None:
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{name} must be a (batch, seq) integer tensor, got {tuple(tokens.shape)} "
            f"{tokens.dtype}"
        )
    if tokens.shape[1] > config.max_seq_len:
        raise ValueError(
            f"{name} has {tokens.shape[1]} positions, more than max_seq_len={config.max_seq_len}"
        )
    check_token_range(tokens, config.vocab_size)


def _check_mask(mask: torch.Tensor, B: int, S: int) -> torch.Tensor:
    if mask.dtype not in (torch.bool, torch.int64, torch.int32, torch.uint8):
        raise TypeError(f"attention_mask must be bool or 0/1 integers, got {mask.dtype}")
    if tuple(mask.shape) != (B, S):
        raise ValueError(f"attention_mask must have shape ({B}, {S}), got {tuple(mask.shape)}")
    return mask.bool()


@torch.no_grad()
def generate_seq2seq(
    model: EncoderDecoderLM,
    tokens: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Decode up to ``max_new_tokens`` tokens for encoder input ``tokens`` ``(B, S)`` (or
    ``(S,)``) with a KV cache; returns the decoder tokens ``(B, 1 + n)`` (or ``(1 + n,)``)
    starting with ``decoder_start_token_id``. Greedy at ``temperature=0``, else sampled after
    the ``top_k`` / ``top_p`` filters; a sequence that emits ``stop_token`` stops."""

    if max_new_tokens < 0 or temperature < 0:
        raise ValueError("max_new_tokens and temperature must be >= 0")
    squeeze = tokens.dim() == 1
    device = model.embed.weight.device
    tokens = (tokens.unsqueeze(0) if squeeze else tokens).to(device)
    B = tokens.shape[0]
    out = torch.full((B, 1), model.config.decoder_start_token_id, dtype=torch.long, device=device)
    steps = min(max_new_tokens, model.config.max_seq_len - 1)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    with serving(model):
        encoded = model.encode(tokens, attention_mask)
        cache = model.new_cache(B, steps + 1)
        next_input = out
        for _ in range(steps):
            logits = model.decode(next_input, encoded, cache).logits[:, -1].float()
            if temperature == 0:
                next_token = logits.argmax(dim=-1)
            else:
                logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
                next_token = sample_tokens(logits.softmax(-1), generator)
            if stop_token is not None:
                next_token = next_token.masked_fill(finished, stop_token)
                finished |= next_token == stop_token
            next_input = next_token.unsqueeze(1)
            out = torch.cat([out, next_input], dim=1)
            if stop_token is not None and finished.all():
                break
    return out.squeeze(0) if squeeze else out
