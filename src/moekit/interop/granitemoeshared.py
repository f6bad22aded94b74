"""Granite MoE with a shared expert (``granitemoeshared``): see ``moekit.interop.granitemoe``."""

from functools import partial

from moekit.interop import granitemoe

MODEL_TYPE = "granitemoeshared"
HF_FIELDS = granitemoe.HF_FIELDS[True]
keymaps = partial(granitemoe.keymaps, shared=True)
config_from_hf = partial(granitemoe.config_from_hf, shared=True)
config_to_hf = partial(granitemoe.config_to_hf, shared=True)
