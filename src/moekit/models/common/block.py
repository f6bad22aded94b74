"""A block built from parts: ``norm → token mixer → residual``, then ``norm → channel mixer →
residual``, with pre-, post- or sandwich norms, residual multipliers and a stored layer scalar;
the norms every model uses; what a language model returns; the token check.

Legend: B = batch, S = sequence positions, D = d_model, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import cast

import torch
from torch import nn

from moekit.experts.dense import FeedForward
from moekit.layers import MoE, MoEConfig, MoEOutput
from moekit.layers.dense_beside import DenseBesideMoE
from moekit.models.common.attention_base import AttentionMixerConfig
from moekit.models.common.cache import Start
from moekit.models.common.layout import TokenMixerConfig
from moekit.utils.device import has_values


class NormKind(str, Enum):
    """The blocks' and the final norm: RMSNorm (Llama and most MoE models) or LayerNorm with a
    bias (Phi-3.5-MoE)."""

    RMS = "rms"
    LAYER = "layer"


class NormPosition(str, Enum):
    """Where each block normalises: before each sublayer (``pre``: ``x + f(norm(x))``, most
    models), after it (``post``: ``x + norm(f(x))``, OLMo-2 and FlexOlmo) or both
    (``sandwich``: ``x + norm'(f(norm(x)))``, Gemma 2-4)."""

    PRE = "pre"
    POST = "post"
    SANDWICH = "sandwich"


def build_norm(kind: NormKind, width: int, eps: float) -> nn.Module:
    """An ``nn.RMSNorm`` or ``nn.LayerNorm`` (with weight and bias) of ``width``."""
    if NormKind(kind) is NormKind.LAYER:
        return nn.LayerNorm(width, eps=eps)
    return nn.RMSNorm(width, eps=eps)


@dataclass
class LMOutput:
    """What the language model returns.

    Attributes:
        logits: ``(B, S, V)``.
        aux_loss: scalar, the sum of every MoE layer's weighted auxiliary loss (0 when dense).
        moe_outputs: each MoE layer's output of this call, in layer order (statistics, losses).
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor
    moe_outputs: list[MoEOutput] = field(default_factory=list)


class Block(nn.Module):
    """A transformer block: a token mixer (attention, or a recurrent mixer), then a dense FFN,
    an MoE layer (``moe_config``) or a dense FFN beside the MoE layer (``dense_beside``), each
    sublayer normalised before (``pre``), after (``post``) or both (``sandwich``).

    Args:
        attention: the block's token mixer config: an attention mixer's or a recurrent
            mixer's (``moekit.models.mixers``), or ``None``; built as ``self.attn`` either way.
        d_model, ffn_hidden, activation, norm_eps: the stream and the dense FFN.
        moe_config: the MoE layer replacing the dense FFN, or ``None``.
        residual_multiplier: scales each sublayer's output (Granite).
        norm, norm_position: the norms' kind and place.
        channel: whether the block has a channel mixer at all (Nemotron-H's one-sublayer
            blocks have not).
        dense_beside: with ``moe_config``, run the dense FFN beside the MoE layer (Gemma 4).
        layer_scalar: a stored scalar multiplies the block's output (Gemma 4).
    """

    def __init__(
        self,
        attention: TokenMixerConfig | AttentionMixerConfig | None,
        *,
        d_model: int,
        ffn_hidden: int,
        activation,
        norm_eps: float,
        moe_config: MoEConfig | None,
        residual_multiplier: float = 1.0,
        norm: NormKind = NormKind.RMS,
        norm_position: NormPosition = NormPosition.PRE,
        channel: bool = True,
        dense_beside: bool = False,
        layer_scalar: bool = False,
    ) -> None:
        super().__init__()
        self.residual_multiplier = residual_multiplier
        position = NormPosition(norm_position)
        self.post_norm = position is NormPosition.POST
        sandwich = position is NormPosition.SANDWICH

        def norm_of(present: bool) -> nn.Module | None:
            return build_norm(norm, d_model, norm_eps) if present else None

        # a missing sublayer (attention=None, channel=False) has no norm either
        self.attn_norm = norm_of(attention is not None)
        self.attn_post_norm = norm_of(attention is not None and sandwich)
        self.attn: nn.Module | None = None
        if attention is not None:
            self.attn = attention.build(d_model=d_model, norm_eps=norm_eps)
        self.ffn: nn.Module | None = None
        if channel:
            dense = FeedForward(d_model, ffn_hidden, activation=activation)
            self.ffn = dense if moe_config is None else moe_config.build(d_model=d_model)
            if moe_config is not None and dense_beside:
                self.ffn = DenseBesideMoE(
                    cast(MoE, self.ffn),
                    d_model=d_model,
                    ffn_hidden=ffn_hidden,
                    activation=activation,
                    norm_eps=norm_eps,
                )
        own_norm = getattr(self.ffn, "normalizes_input", False) and not self.post_norm
        self.ffn_norm = norm_of(channel and not own_norm)
        self.ffn_post_norm = norm_of(channel and sandwich)
        self.layer_scalar: torch.Tensor | None
        self.register_buffer("layer_scalar", torch.ones(1) if layer_scalar else None)

    def forward(
        self,
        x_BSD: torch.Tensor,
        *,
        rope=None,
        cache=None,
        start: Start = 0,
        key_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEOutput | None, torch.Tensor | None]:
        """``(x, the MoE layer's output or None, the token mixer's auxiliary loss or None)``."""
        mixer_loss = None
        if self.attn is not None and self.attn_norm is not None:
            h_BSD = x_BSD if self.post_norm else self.attn_norm(x_BSD)
            out, mixer_loss = self._mix(
                self.attn, h_BSD, rope, cache, start, key_mask, padding_mask, segment_ids
            )
            x_BSD = self._residual(x_BSD, out, self.attn_norm, self.attn_post_norm)
        x_BSD, moe_out = self.mix_channels(x_BSD, padding_mask, token_ids)
        if self.layer_scalar is not None:
            x_BSD = x_BSD * self.layer_scalar.to(x_BSD.dtype)
        return x_BSD, moe_out, mixer_loss

    def mix_channels(
        self,
        x_BSD: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEOutput | None]:
        """The channel-mixer sublayer: ``(x + ffn(norm(x)), the MoE layer's output or None)``
        (or the block's post/sandwich norms)."""
        if self.ffn is None:
            return x_BSD, None
        moe_out = None
        pre = self.ffn_norm is not None and not self.post_norm
        h_BSD = self.ffn_norm(x_BSD) if pre else x_BSD  # type: ignore[misc]
        if isinstance(self.ffn, MoE | DenseBesideMoE):
            moe_out = self.ffn(h_BSD, padding_mask, token_ids)
            y = moe_out.output
        else:
            y = self.ffn(h_BSD)
        return self._residual(x_BSD, y, self.ffn_norm, self.ffn_post_norm), moe_out

    def keep_registration_order(self, names: list[str]) -> None:
        """Register this block's submodules in ``names``' order (then the rest): the order
        ``parameters()`` lists them in, which optimizer checkpoints saved before they named
        their parameters map moments by."""
        modules = self._modules
        ordered = {name: modules[name] for name in names}
        ordered.update((name, module) for name, module in modules.items() if name not in ordered)
        self._modules = ordered  # type: ignore[assignment]

    def _residual(
        self,
        x_BSD: torch.Tensor,
        out: torch.Tensor,
        norm: nn.Module | None,
        post_norm: nn.Module | None,
    ) -> torch.Tensor:
        """``x + m · out`` after the sublayer's post-norm (``post``: ``norm``; ``sandwich``:
        ``post_norm``), ``m`` the residual multiplier."""
        if self.post_norm and norm is not None:  # x + norm(f(x)) (OLMo-2, FlexOlmo)
            out = norm(out)
        elif post_norm is not None:
            out = post_norm(out)
        m = self.residual_multiplier
        return x_BSD + (out if m == 1.0 else out * m)

    @staticmethod
    def _mix(attn, h_BSD, rope, cache, start, key_mask, padding_mask, segment_ids):
        """The token mixer's output and auxiliary loss: attention takes positions and a key
        mask, a recurrent mixer the padding mask and the segments of packed sequences; a mixer
        with a router (a mixture of attention heads) returns its loss with its output."""
        if getattr(attn, "recurrent", False):
            out = attn(h_BSD, cache=cache, mask_BS=padding_mask, segment_ids_BS=segment_ids)
            return out, None
        if hasattr(attn, "forward_with_loss"):
            return attn.forward_with_loss(
                h_BSD, rope=rope, cache=cache, start=start, key_mask=key_mask
            )
        return attn(h_BSD, rope=rope, cache=cache, start=start, key_mask=key_mask), None


def host_reads_are_free(tensor: torch.Tensor) -> bool:
    """Whether reading ``tensor``'s values on the host costs no device sync (the CPU)."""
    return tensor.device.type == "cpu"


def check_token_range(tokens: torch.Tensor, vocab_size: int) -> None:
    """Refuse token ids outside ``[0, vocab_size)``: a ``ValueError`` on the CPU; on an
    accelerator an asynchronous device assert (reading the values would stall the host every
    forward and every decode step). Skipped for fake, meta and traced tensors, and inside
    ``torch.compile``."""
    if torch.compiler.is_compiling() or not tokens.numel() or not has_values(tokens):
        return  # (a compiled decoding step's tokens are the model's own)
    message = f"token ids must be in [0, vocab_size={vocab_size})"
    if host_reads_are_free(tokens):
        if tokens.min() < 0 or tokens.max() >= vocab_size:
            raise ValueError(message)
        return
    torch._assert_async(((tokens >= 0) & (tokens < vocab_size)).all(), message)
