"""Qwen3-MoE family module (see ``moekit.interop.qwen_moe``)."""

from __future__ import annotations

from functools import partial

from moekit.interop import qwen_moe

MODEL_TYPE = "qwen3_moe"
keymaps = partial(qwen_moe.keymaps, qwen3=True)
config_from_hf = partial(qwen_moe.config_from_hf, qwen3=True)
config_to_hf = partial(qwen_moe.config_to_hf, qwen3=True)
HF_FIELDS = qwen_moe.HF_FIELDS[True]
