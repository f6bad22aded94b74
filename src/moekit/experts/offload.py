"""Experts outside fast memory: read one expert at a time from a safetensors file into a
cache of hot experts with a byte budget (inference).

Legend: M = expert-sorted rows, D = d_model, E = experts.

``ExpertStore`` reads expert ``e`` of a layer as a slice of the checkpoint's stacked tensors:
only those bytes, with a positioned read at the offset the safetensors header gives.
``ExpertCache`` keeps the most useful experts within ``budget_bytes`` on the compute device
(least recently or least frequently used is evicted), counts hits and misses, and can load
predicted experts ahead of need on a background thread (prefetch). ``OffloadedExpertBank``
is a drop-in expert bank: for each expert that has rows it takes the weights from the cache and
runs the same per-expert computation as the resident bank (``expert_ffn`` or
``quantized_expert_ffn`` on a one-expert stack), so outputs are bitwise those of the resident
model on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from moekit.experts.activations import Activation
from moekit.experts.fused_ffn import expert_ffn
from moekit.experts.quantized import QuantizationConfig, _expert_spans, quantized_expert_ffn

#: a cached expert: its tensors by name (``w_in_EDH``/``w_out_EHD`` or the codes and scales,
#: and the biases), each without the expert dimension
ExpertWeights = dict[str, torch.Tensor]
Key = tuple[str, int]  # (bank prefix, expert)


class EvictionPolicy(str, Enum):
    """Which cached expert leaves when a new one needs room."""

    LRU = "lru"  # least recently used
    LFU = "lfu"  # least frequently used (ties: least recently)


@dataclass
class CacheStats:
    """What the cache did: lookups that found the expert (``hits``), that had to read it
    (``misses``), experts read ahead of need (``prefetched``) and later used (``prefetch_hits``),
    experts dropped (``evictions``), and the most bytes it held at once (``peak_bytes``)."""

    hits: int = 0
    misses: int = 0
    prefetched: int = 0
    prefetch_hits: int = 0
    evictions: int = 0
    peak_bytes: int = 0
    bytes_read: int = 0

    @property
    def hit_rate(self) -> float:
        """Share of lookups served from the cache (0 before any lookup)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def parse_bytes(text: str | int) -> int:
    """``"64KB"``, ``"512MB"``, ``"2GB"`` (powers of 1000), ``"1GiB"`` (powers of 1024) or a
    plain number of bytes -> bytes. Raises naming the text and the allowed units."""
    if isinstance(text, int):
        return text
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise ValueError(
            f"expert budget {text!r} is not a size: write a positive number with a unit such as "
            "64KB, 512MB, 2GB (powers of 1000) or 512MiB, 2GiB (powers of 1024)"
        )
    return int(value * units[unit])


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class ExpertStore:
    """Reads single experts from a checkpoint's ``model.safetensors`` with positioned reads of
    exactly their bytes (``os.pread``; no memory map, so the process holds only what the cache
    keeps; the operating system's page cache may keep the file warm).

    Args:
        path: the safetensors file.
        device: where read experts are put (the compute device).
        dtype: float weights are cast to it (``None``: as stored); codes and scales stay.

    Raises ``ValueError`` naming the file when its header is not a safetensors header.
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", dtype=None) -> None:
        self.path = Path(path)
        self.device, self.dtype = torch.device(device), dtype
        self._fd: int | None = None
        fd = self._fd = os.open(self.path, os.O_RDONLY)
        try:
            (size,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            if size > os.fstat(fd).st_size - 8:
                raise ValueError(f"the header claims {size} bytes, more than the file holds")
            header = json.loads(os.pread(fd, size, 8))
        except (struct.error, ValueError, OSError) as error:
            os.close(fd)
            self._fd = None
            raise ValueError(f"{self.path} is not a readable safetensors file: {error}") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + size
        self._tensors: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        for name, info in header.items():
            if info.get("dtype") not in _DTYPES:
                raise ValueError(f"{self.path}: tensor {name} has unknown dtype {info!r}")
            begin, end = info["data_offsets"]
            self._tensors[name] = (_DTYPES[info["dtype"]], list(info["shape"]), begin, end)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None

    def names_under(self, prefix: str) -> list[str]:
        """The tensor names of the bank at ``prefix`` (``blocks.0.ffn.experts``)."""
        return sorted(n.rsplit(".", 1)[1] for n in self._tensors if n.rsplit(".", 1)[0] == prefix)

    def shape(self, name: str) -> list[int]:
        """The stored shape of tensor ``name``."""
        return list(self._tensors[name][1])

    def _read_slice(self, name: str, expert: int) -> torch.Tensor:
        dtype, shape, begin, end = self._tensors[name]
        per_expert = (end - begin) // shape[0]
        assert self._fd is not None
        data = os.pread(self._fd, per_expert, self._data_start + begin + expert * per_expert)
        if len(data) != per_expert:
            raise ValueError(f"{self.path} is truncated: {name} expert {expert} is incomplete")
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape[1:])

    def read(self, prefix: str, expert: int, tensors: Iterable[str]) -> ExpertWeights:
        """Expert ``expert``'s slice of each of ``tensors`` under ``prefix``."""
        out: ExpertWeights = {}
        for name in tensors:
            t = self._read_slice(f"{prefix}.{name}", expert)
            if self.dtype is not None and t.is_floating_point() and not name.endswith("_scales"):
                t = t.to(self.dtype)
            out[name] = t.to(self.device)
        return out

    def expert_bytes(self, prefix: str, tensors: Iterable[str]) -> int:
        """Bytes of one expert of the bank at ``prefix`` (as held in the cache)."""
        total = 0
        for name in tensors:
            dtype, shape, _, _ = self._tensors[f"{prefix}.{name}"]
            if self.dtype is not None and dtype.is_floating_point and not name.endswith("_scales"):
                dtype = self.dtype
            total += dtype.itemsize * math.prod(shape[1:])
        return total


class ExpertCache:
    """Hot experts within ``budget_bytes``; see the module docstring.

    ``get(key, load, nbytes)`` returns the cached weights or calls ``load()`` (a miss), evicting
    by ``policy`` until the new expert fits. ``prefetch(key, load, nbytes)`` loads in the
    background; a ``get`` of an expert being prefetched waits for it (a prefetch hit).
    """

    def __init__(
        self, budget_bytes: int, policy: EvictionPolicy | str = EvictionPolicy.LRU
    ) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"expert budget must be > 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.policy = EvictionPolicy(policy)
        self.stats = CacheStats()
        self._entries: OrderedDict[Key, tuple[ExpertWeights, int]] = OrderedDict()
        self._uses: Counter[Key] = Counter()
        self._bytes = 0
        self._lock = threading.RLock()
        self._pending: dict[Key, Future] = {}
        self._prefetched: set[Key] = set()
        self._executor: ThreadPoolExecutor | None = None

    @property
    def resident_bytes(self) -> int:
        """Bytes of the experts held now."""
        return self._bytes

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def check_fits(self, nbytes: int, what: str) -> None:
        """Refuse a budget smaller than one expert (naming both sizes)."""
        if nbytes > self.budget_bytes:
            raise ValueError(
                f"expert budget of {self.budget_bytes} bytes is smaller than one expert of "
                f"{what} ({nbytes} bytes); raise --expert-budget to at least {nbytes} bytes"
            )

    def _evict_for(self, nbytes: int, keep: Key | None = None) -> None:
        while self._entries and self._bytes + nbytes > self.budget_bytes:
            candidates = [k for k in self._entries if k != keep]
            if not candidates:
                break
            if self.policy is EvictionPolicy.LRU:
                victim = candidates[0]  # OrderedDict: least recently used first
            else:  # fewest uses; among those the least recently used
                victim = min(candidates, key=lambda k: self._uses[k])
            _, size = self._entries.pop(victim)
            self._bytes -= size
            self._prefetched.discard(victim)
            self.stats.evictions += 1

    def _insert(self, key: Key, weights: ExpertWeights, nbytes: int) -> None:
        self._evict_for(nbytes)
        self._entries[key] = (weights, nbytes)
        self._bytes += nbytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self._bytes)
        self.stats.bytes_read += nbytes

    def get(self, key: Key, load: Callable[[], ExpertWeights], nbytes: int) -> ExpertWeights:
        """The weights of ``key``, from the cache or loaded now."""
        pending = self._pending.get(key)
        if pending is not None:
            pending.result()  # a prefetch of this expert is under way: wait for it
        with self._lock:
            self._uses[key] += 1
            if key in self._entries:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                if key in self._prefetched:
                    self.stats.prefetch_hits += 1
                    self._prefetched.discard(key)
                return self._entries[key][0]
            self.stats.misses += 1
        weights = load()
        with self._lock:
            if key not in self._entries:
                self._insert(key, weights, nbytes)
        return weights

    def prefetch(self, key: Key, load: Callable[[], ExpertWeights], nbytes: int) -> None:
        """Load ``key`` in the background unless it is cached or already on its way."""
        with self._lock:
            if key in self._entries or key in self._pending:
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="moekit-prefetch")
            self._pending[key] = self._executor.submit(self._load_ahead, key, load, nbytes)

    def _load_ahead(self, key: Key, load: Callable[[], ExpertWeights], nbytes: int) -> None:
        try:
            weights = load()
            with self._lock:
                if key not in self._entries:
                    self._insert(key, weights, nbytes)
                    self._prefetched.add(key)
                    self.stats.prefetched += 1
        finally:
            with self._lock:
                self._pending.pop(key, None)

    def wait(self) -> None:
        """Block until every prefetch has finished."""
        for future in list(self._pending.values()):
            future.result()

    def close(self) -> None:
        """Finish prefetches and stop the background thread."""
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class OffloadedExpertBank(nn.Module):
    """An expert bank whose weights live in an ``ExpertStore`` and an ``ExpertCache``; same
    interface as ``ExpertBank`` (``bank(x_MD, counts_E) -> y_MD``), for inference.

    Args:
        store, cache: where the weights are read from and kept.
        prefix: the bank's name in the checkpoint (``blocks.0.ffn.experts``).
        num_experts, d_model, hidden, activation: the bank's shape.
        quantization: the stored format (``None``: full-precision ``w_in_EDH``/``w_out_EHD``).
    """

    def __init__(
        self,
        store: ExpertStore,
        cache: ExpertCache,
        prefix: str,
        *,
        num_experts: int,
        d_model: int,
        hidden: int,
        activation: Activation | str,
        quantization: QuantizationConfig | None,
    ) -> None:
        super().__init__()
        self.store, self.cache, self.prefix = store, cache, prefix
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.activation = Activation(activation)
        self.quantization = quantization
        self.adapter = None
        self.tensor_names = store.names_under(prefix)
        weights = (
            {"w_in_EDH", "w_out_EHD"}
            if quantization is None
            else {"w_in_codes", "w_in_scales", "w_out_codes", "w_out_scales"}
        )
        missing = weights - set(self.tensor_names)
        if missing:
            raise ValueError(f"{store.path} has no {sorted(missing)} under {prefix!r}")
        self.has_bias = "b_in_EH" in self.tensor_names
        self.expert_bytes = store.expert_bytes(prefix, self.tensor_names)
        cache.check_fits(self.expert_bytes, prefix)

    def _loader(self, expert: int) -> Callable[[], ExpertWeights]:
        return lambda: self.store.read(self.prefix, expert, self.tensor_names)

    def weights_of(self, expert: int) -> ExpertWeights:
        """Expert ``expert``'s weights, through the cache."""
        return self.cache.get((self.prefix, expert), self._loader(expert), self.expert_bytes)

    def prefetch(self, experts: Iterable[int]) -> None:
        """Start reading ``experts`` into the cache in the background."""
        for e in experts:
            self.cache.prefetch((self.prefix, int(e)), self._loader(int(e)), self.expert_bytes)

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """``(M, D)`` expert-sorted rows -> ``(M, D)``, one cached expert at a time."""
        y_MD = x_MD.new_zeros(x_MD.shape[0], self.d_model)
        for e, start, count in _expert_spans(counts_E):
            w = self.weights_of(e)
            one = torch.tensor([count], device=x_MD.device)
            y_MD[start : start + count] = self._run(w, x_MD[start : start + count], one)
        return y_MD

    def _run(self, w: ExpertWeights, x_ND: torch.Tensor, one: torch.Tensor) -> torch.Tensor:
        b_in = w["b_in_EH"][None] if self.has_bias else None
        b_out = w["b_out_ED"][None] if self.has_bias else None
        if self.quantization is None:
            return expert_ffn(
                x_ND,
                one,
                w["w_in_EDH"][None],
                w["w_out_EHD"][None],
                b_in_EH=b_in,
                b_out_ED=b_out,
                activation=self.activation,
            )
        return quantized_expert_ffn(
            x_ND,
            one,
            (w["w_in_codes"][None], w["w_in_scales"][None]),
            (w["w_out_codes"][None], w["w_out_scales"][None]),
            b_in,
            b_out,
            activation=self.activation,
            quantization=self.quantization,
        )

    def extra_repr(self) -> str:
        return (
            f"prefix={self.prefix!r}, num_experts={self.num_experts}, "
            f"expert_bytes={self.expert_bytes}"
        )
