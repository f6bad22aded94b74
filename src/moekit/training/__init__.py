"""Training: data, config, optimizer, one readable loop, checkpoints."""

from moekit.training.config import OptimConfig, TrainConfig, load_train_config
from moekit.training.data import ByteTokenizer, DataConfig, load_corpus
from moekit.training.loop import TrainResult, evaluate, train

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "load_corpus",
    "load_train_config",
    "train",
]
