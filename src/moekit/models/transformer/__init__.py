"""Decoder-only MoE transformer language model."""

from moekit.models.transformer.attention import (
    Attention,
    AttentionConfig,
    KVCache,
    QKNorm,
    QueryTemperatureConfig,
    ValueSource,
)
from moekit.models.transformer.attention_base import AttentionMixerConfig
from moekit.models.transformer.generate import filter_logits, generate
from moekit.models.transformer.layout import AnyAttentionConfig, TokenMixerLayout
from moekit.models.transformer.mla import MLAConfig, MultiHeadLatentAttention
from moekit.models.transformer.moa import MixtureOfAttentionHeads, MoAConfig
from moekit.models.transformer.model import Block, LMOutput, TransformerConfig, TransformerLM
from moekit.models.transformer.placement import MoEPlacementConfig
from moekit.models.transformer.rotary import RopeScalingConfig, RotaryConfig

__all__ = [
    "AnyAttentionConfig",
    "Attention",
    "AttentionConfig",
    "AttentionMixerConfig",
    "Block",
    "KVCache",
    "LMOutput",
    "MLAConfig",
    "MixtureOfAttentionHeads",
    "MoAConfig",
    "MoEPlacementConfig",
    "MultiHeadLatentAttention",
    "QKNorm",
    "QueryTemperatureConfig",
    "RopeScalingConfig",
    "RotaryConfig",
    "TokenMixerLayout",
    "TransformerConfig",
    "TransformerLM",
    "ValueSource",
    "filter_logits",
    "generate",
]
