"""Vision MoE: a ViT classifier whose FFN is an MoE layer in every other block (V-MoE, Riquelme
et al. 2021, "Scaling Vision with Sparse Mixture of Experts").

Legend: B = images, C = channels, P = patch size, N = patches, D = d_model, K = classes.

Images are cut into P x P patches, linearly embedded, given learned position embeddings and
run through bidirectional pre-norm blocks (the same ``Block`` as the language model, without
causal masking or rotary positions); the class logits come from the mean of the final tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.layers import MoEConfig, MoEOutput
from moekit.models.common.attention import AttentionConfig
from moekit.models.common.block import Block
from moekit.models.common.placement import MoEPlacementConfig, drop_layer_d_model
from moekit.utils.validation import check_fields


def vmoe_placement(activation: Activation = Activation.GELU) -> MoEPlacementConfig:
    """V-MoE's default (Riquelme et al. 2021): 8 experts, top-2, in every other block."""
    return MoEPlacementConfig(
        layer=MoEConfig(
            num_experts=8,
            top_k=2,
            experts=ExpertConfig(hidden=128, activation=activation),
        ),
        every=2,
    )


@dataclass(kw_only=True)
class VisionMoEConfig:
    """A ViT with MoE FFNs.

    Args:
        image_size: height = width of the input images.
        patch_size: P; must divide ``image_size``.
        channels: C.
        num_classes: K.
        d_model, n_layers, n_heads, ffn_hidden: transformer shape (dense FFN width).
        activation: FFN and expert activation (GELU, as in ViT).
        norm_eps: RMSNorm epsilon.
        moe: MoE placement; ``None`` (the default): :func:`vmoe_placement`, an MoE in every
            other block (V-MoE); ``MoEPlacementConfig()`` for a dense ViT.
    """

    image_size: int
    patch_size: int
    channels: int = 3
    num_classes: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int = 256
    activation: Activation = Activation.GELU
    norm_eps: float = 1e-6
    moe: MoEPlacementConfig | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if self.moe is None:
            self.moe = vmoe_placement(self.activation)
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size={self.patch_size} must divide image_size={self.image_size}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")

    def build(self) -> VisionMoE:
        """The ``VisionMoE`` of this config (randomly initialised)."""
        return VisionMoE(self)

    @classmethod
    def prepare_config_dict(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A file with the MoE layer's width (``moe.layer.d_model``, now the model's) is read as
        it meant."""
        if not isinstance(data.get("moe"), dict):
            return data
        return {**data, "moe": drop_layer_d_model(data["moe"], data.get("d_model", 128))}

    @property
    def placement(self) -> MoEPlacementConfig:
        """``moe`` after the default is resolved."""
        assert self.moe is not None
        return self.moe

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class VisionOutput:
    """Class logits ``(B, K)``, the summed weighted auxiliary loss, and each MoE layer's output."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    moe_outputs: list[MoEOutput] = field(default_factory=list)


class VisionMoE(nn.Module):
    """``images (B, C, H, W) -> VisionOutput``."""

    model_type = "moekit_vision_moe"

    def __init__(self, config: VisionMoEConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.patch_embed = nn.Conv2d(
            config.channels, d, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.pos_embed = nn.Parameter(torch.randn(1, config.num_patches, d) * 0.02)
        head_dim = d // config.n_heads
        self.blocks = nn.ModuleList(
            Block(
                AttentionConfig(
                    n_heads=config.n_heads,
                    n_kv_heads=config.n_heads,
                    head_dim=head_dim,
                    causal=False,
                    rope=None,
                ),
                d_model=d,
                ffn_hidden=config.ffn_hidden,
                activation=config.activation,
                norm_eps=config.norm_eps,
                moe_config=config.placement.layer_for(i, config.n_layers),
            )
            for i in range(config.n_layers)
        )
        self.norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.head = nn.Linear(d, config.num_classes)

    def forward(self, images: torch.Tensor) -> VisionOutput:
        cfg = self.config
        expected = (cfg.channels, cfg.image_size, cfg.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape (B, {', '.join(map(str, expected))}), got "
                f"{tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point, got {images.dtype}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        aux_loss = x.new_zeros(())
        moe_outputs: list[MoEOutput] = []
        for block in self.blocks:
            x, moe_out, mixer_loss = block(x)
            if moe_out is not None:
                moe_outputs.append(moe_out)
                aux_loss = aux_loss + moe_out.aux_loss
            if mixer_loss is not None:
                aux_loss = aux_loss + mixer_loss
        logits = self.head(self.norm(x).mean(dim=1))
        return VisionOutput(logits=logits, aux_loss=aux_loss, moe_outputs=moe_outputs)
