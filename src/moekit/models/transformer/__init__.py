"""Decoder-only MoE transformer language model."""

from moekit.models.transformer.attention import Attention, AttentionConfig, KVCache
from moekit.models.transformer.generate import filter_logits, generate
from moekit.models.transformer.model import Block, LMOutput, TransformerConfig, TransformerLM
from moekit.models.transformer.placement import MoEPlacementConfig

__all__ = [
    "Attention",
    "AttentionConfig",
    "Block",
    "KVCache",
    "LMOutput",
    "MoEPlacementConfig",
    "TransformerConfig",
    "TransformerLM",
    "filter_logits",
    "generate",
]
