"""Parameter-efficient adapters for moekit models: LoRA on attention, dense FFNs, shared experts
and the stacked routed experts (``lora.py``)."""

from moekit.adapters.lora import (
    TARGET_GROUPS,
    DenseLoRA,
    ExpertLoRA,
    LoRAConfig,
    LoRALinear,
    add_lora,
    lora_parameters,
    merge_lora,
    remove_lora,
    unmerge_lora,
)

__all__ = [
    "TARGET_GROUPS",
    "DenseLoRA",
    "ExpertLoRA",
    "LoRAConfig",
    "LoRALinear",
    "add_lora",
    "lora_parameters",
    "merge_lora",
    "remove_lora",
    "unmerge_lora",
]
