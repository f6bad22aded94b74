"""Token mixers other than softmax attention, each a sibling class with its own config (a
``kind`` key chooses it in files): Gated DeltaNet, Mamba, Mamba2 and the gated short
convolution, with the recurrences, scans and convolution they share (loop references and
chunked parallel forms)."""

from moekit.models.mixers.base import GatedRMSNorm, RecurrentMixer, RecurrentMixerConfig
from moekit.models.mixers.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from moekit.models.mixers.mamba import Mamba, MambaConfig
from moekit.models.mixers.mamba2 import Mamba2, Mamba2Config
from moekit.models.mixers.short_conv import ShortConv, ShortConvConfig

#: the recurrent mixers' configs by ``kind``
MIXER_CONFIGS = RecurrentMixerConfig.registry

__all__ = [
    "MIXER_CONFIGS",
    "GatedDeltaNet",
    "GatedDeltaNetConfig",
    "GatedRMSNorm",
    "Mamba",
    "Mamba2",
    "Mamba2Config",
    "MambaConfig",
    "RecurrentMixer",
    "RecurrentMixerConfig",
    "ShortConv",
    "ShortConvConfig",
]
