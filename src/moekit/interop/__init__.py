"""Hugging Face interop: declarative key maps, one module per model family."""

from moekit.interop.hf import FAMILIES, from_hf, read_hf_folder, to_hf

__all__ = ["FAMILIES", "from_hf", "read_hf_folder", "to_hf"]
