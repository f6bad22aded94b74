"""Fixtures shared by every test (the builders live in tests/builders.py)."""

from __future__ import annotations

import os

import pytest
import torch

# the Triton kernels run under Triton's interpreter where there is no GPU (set before any
# module defines them)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # the interpreter cannot time autotuning candidates: Liger's kernels take one config each
    os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_text(tmp_path):
    """A small corpus of real text: a few standard-library modules copied to a folder."""
    from moekit.training.data import standard_library_files

    folder = tmp_path / "corpus"
    folder.mkdir()
    for path in standard_library_files()[:6]:
        (folder / path.name).write_text(path.read_text(encoding="utf-8", errors="replace"))
    return folder
