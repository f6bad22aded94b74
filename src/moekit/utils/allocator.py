"""Keep freed CPU memory in the process, so large tensors stop page-faulting every step.

PyTorch's CPU allocator hands large requests to glibc ``malloc``, which serves them with fresh
``mmap`` pages and returns them to the OS on free. A training step that allocates hundreds of MB
of activations and expert-weight gradients then pays a page fault per 4 KiB page every step
(measured here at ~2.5-3 GB/s, against ~15 GB/s for warm memory). Raising glibc's mmap and trim
thresholds keeps that memory in the heap for reuse. This is a process-wide setting, so moekit
never applies it on import: training scripts and benchmarks opt in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 34) -> bool:
    """Raise glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` (same effect as the
    ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` environment variables).

    Returns:
        ``True`` if both settings were applied, ``False`` where glibc is not available.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, 2**31 - 1)) == 1
    trim_ok = mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1)) == 1
    return mmap_ok and trim_ok
