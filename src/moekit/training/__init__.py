"""Training: data, config, optimizer, one readable loop, checkpoints."""

from moekit.training.config import OptimConfig, TrainConfig, load_train_config
from moekit.training.data import ByteTokenizer, DataConfig, load_corpus
from moekit.training.evolution import train_any, train_evolved
from moekit.training.loop import TrainResult, evaluate, train
from moekit.training.methods import TrainingMethod

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainResult",
    "TrainingMethod",
    "evaluate",
    "load_corpus",
    "load_train_config",
    "train",
    "train_any",
    "train_evolved",
]
