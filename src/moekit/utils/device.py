"""Which device a run uses, and mixed precision that suits it.

``device``: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or
``mps``. Under ``torchrun`` a bare ``cuda`` (or ``auto`` on a GPU host) means this process's
GPU, ``cuda:$LOCAL_RANK``.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings

import torch
from torch._subclasses.fake_tensor import is_fake

DEVICE_CHOICES = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"


def check_device_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is one of :data:`DEVICE_CHOICES`."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise ValueError(f"device must be {DEVICE_CHOICES}, got {name!r}")


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` for ``name``; ``local_rank`` defaults to ``$LOCAL_RANK`` (torchrun).

    Raises ``ValueError`` when the device is not available here.
    """
    check_device_name(name)
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("device='mps' was asked for, but this machine has no MPS device")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was asked for, but torch sees no CUDA device here")
    index = local_rank if name == "cuda" else int(name.split(":")[1])
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"device cuda:{index} does not exist (this machine has {torch.cuda.device_count()} "
            "CUDA devices)"
        )
    return torch.device("cuda", index)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX-512 BF16 or AMX); without
    them a bf16 matmul ran ~80x slower than fp32 on an AVX2-only CPU here."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    if "amx" in capability or "avx512_bf16" in capability:
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``bf16``, else a no-op; warns on a CPU without native
    bf16 support, where bf16 is far slower than fp32."""
    if not bf16:
        return contextlib.nullcontext()
    if device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(
            "bf16 autocast on a CPU without native bf16 support "
            f"({torch.backends.cpu.get_cpu_capability()}): matrix products run much slower "
            "than in fp32 here; set bf16=false",
            stacklevel=2,
        )
    return torch.autocast(device.type, dtype=torch.bfloat16)


def distributed_backend(device: torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def has_values(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s values can be read: not a fake or meta tensor (device-placement
    tests, shape propagation) and not traced by ``torch.compile``. Input checks that read
    values are skipped otherwise."""

    return not (tensor.is_meta or is_fake(tensor) or torch.compiler.is_compiling())


def use_bf16(bf16: bool | str, device: torch.device) -> bool:
    """Whether a run with ``bf16`` (``True``, ``False`` or ``"auto"``) uses bf16 autocast on
    ``device``: ``auto`` is on for CUDA devices that support bf16 and off elsewhere."""
    if bf16 == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(bf16)


def set_matmul_precision(device: torch.device, tf32: bool) -> None:
    """TF32 tensor cores for fp32 matrix products on a CUDA ``device`` when ``tf32`` (about 8x
    full fp32 on Hopper; the mantissa of inputs is rounded to 10 bits). No-op elsewhere."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
