"""Count the operations that would make the host wait for a CUDA device.

On a GPU, reading a tensor's value on the host (``.item()``, ``float(t)``, ``if t:``,
``.tolist()``, ``.cpu()``), ``nonzero``, ``bincount`` and boolean-mask indexing and assignment
(output shape or work depends on the data), and
``torch.tensor(value, device=cuda)`` (a copy from pageable host memory) block the CPU until the
device has caught up: the CPU can no longer queue work ahead. The same ops
run on the CPU, so :class:`HostSyncCounter` proves on the CPU which code paths would sync on
CUDA. ``torch.cuda.set_sync_debug_mode`` says the same on a real device.
"""

from __future__ import annotations

import traceback
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# ops whose result needs device values on the host
_SYNCING = {
    _aten._local_scalar_dense.default: "item",  # .item(), float(t), int(t), bool(t)
    _aten.nonzero.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten.unique_consecutive.default: "unique",
    _aten._unique2.default: "unique",
    _aten.repeat_interleave.Tensor: "repeat_interleave without output_size",
    _aten.equal.default: "torch.equal",
    _aten.bincount.default: "bincount",  # its length is the largest value + 1
    _aten.is_nonzero.default: "item",
    # torch.tensor(python value, device=cuda): a copy from pageable host memory, which waits
    _aten.lift_fresh.default: "torch.tensor from host values",
}


class HostSyncCounter(TorchDispatchMode):
    """Inside the block, counts the ops that would sync a CUDA device, by kind:
    ``counter.total`` and ``counter.kinds`` (a ``Counter``). ``Tensor.tolist()`` and
    ``Tensor.cpu()`` are counted through ``patch_tolist=True`` (on the CPU they read memory or
    return the tensor itself without dispatching an op; from a CUDA tensor both wait for the
    device)."""

    def __init__(self, patch_tolist: bool = True) -> None:
        super().__init__()
        self.kinds: Counter[str] = Counter()
        self.where: list[str] = []
        self._patch_tolist = patch_tolist
        self._tolist: Any = None
        self._cpu: Any = None

    @property
    def total(self) -> int:
        return sum(self.kinds.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _SYNCING.get(func)
        if func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default) and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in (args[1] if len(args) > 1 else [])
            if i is not None
        ):
            kind = (
                "boolean-mask indexing" if func is _aten.index.Tensor else "boolean-mask assignment"
            )
        if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None:
            kind = None
        if kind is not None:
            self._record(kind)
        return func(*args, **kwargs)

    def _record(self, kind: str) -> None:

        self.kinds[kind] += 1
        frames = [f for f in traceback.extract_stack()[:-3] if "moekit" in f.filename]
        if frames:
            f = frames[-1]
            self.where.append(f"{kind} at {f.filename.split('moekit/')[-1]}:{f.lineno}")

    def __enter__(self):
        if self._patch_tolist:
            self._tolist = torch.Tensor.tolist
            counter = self

            def tolist(tensor: torch.Tensor):
                counter._record("tolist")
                return counter._tolist(tensor)

            torch.Tensor.tolist = tolist  # type: ignore[method-assign,assignment]
            self._cpu = torch.Tensor.cpu

            def cpu(tensor: torch.Tensor, *args: Any, **kwargs: Any):
                counter._record("cpu")
                return counter._cpu(tensor, *args, **kwargs)

            torch.Tensor.cpu = cpu  # type: ignore[method-assign,assignment]
        return super().__enter__()

    def __exit__(self, *exc):
        if self._tolist is not None:
            torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
            self._tolist = None
        if self._cpu is not None:
            torch.Tensor.cpu = self._cpu  # type: ignore[method-assign]
            self._cpu = None
        return super().__exit__(*exc)
