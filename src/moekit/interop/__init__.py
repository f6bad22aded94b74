"""Hugging Face interop: declarative key maps, one module per model family, block swap."""

from moekit.interop.block_swap import MoEBlock, swap_moe_blocks
from moekit.interop.hf import FAMILIES, from_hf, read_hf_folder, to_hf

__all__ = ["FAMILIES", "MoEBlock", "from_hf", "read_hf_folder", "swap_moe_blocks", "to_hf"]
