"""Models built from MoE layers: a decoder-only transformer LM and a vision MoE (ViT)."""

from moekit.models.checkpoint import from_pretrained, read_config, save_pretrained
from moekit.models.transformer import (
    AttentionConfig,
    KVCache,
    LMOutput,
    MoEPlacementConfig,
    TransformerConfig,
    TransformerLM,
    generate,
)
from moekit.models.vision import VisionMoE, VisionMoEConfig, VisionOutput

__all__ = [
    "AttentionConfig",
    "KVCache",
    "LMOutput",
    "MoEPlacementConfig",
    "TransformerConfig",
    "TransformerLM",
    "VisionMoE",
    "VisionMoEConfig",
    "VisionOutput",
    "from_pretrained",
    "generate",
    "read_config",
    "save_pretrained",
]
