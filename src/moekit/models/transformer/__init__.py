"""Decoder-only MoE transformer language model."""

from moekit.models.common.attention import (
    Attention,
    AttentionConfig,
    KVCache,
    QKNorm,
    QueryTemperatureConfig,
    ValueSource,
)
from moekit.models.common.attention_base import AttentionMixerConfig
from moekit.models.common.layout import AnyAttentionConfig, TokenMixerLayout
from moekit.models.common.mla import MLAConfig, MultiHeadLatentAttention
from moekit.models.common.moa import MixtureOfAttentionHeads, MoAConfig
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.common.rotary import RopeScalingConfig, RotaryConfig
from moekit.models.transformer.generate import filter_logits, generate
from moekit.models.transformer.model import Block, LMOutput, TransformerConfig, TransformerLM

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
