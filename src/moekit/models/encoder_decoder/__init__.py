"""Encoder–decoder MoE transformers (T5 with MoE layers: Switch Transformer, ST-MoE)."""

from moekit.models.encoder_decoder.model import (
    EncoderDecoderConfig,
    EncoderDecoderLM,
    EncoderOutput,
    Seq2SeqCache,
    generate_seq2seq,
)
from moekit.models.encoder_decoder.relative_position import (
    RelativePositionBias,
    relative_position_bucket,
)

__all__ = [
    "EncoderDecoderConfig",
    "EncoderDecoderLM",
    "EncoderOutput",
    "RelativePositionBias",
    "Seq2SeqCache",
    "generate_seq2seq",
    "relative_position_bucket",
]
