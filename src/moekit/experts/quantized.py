"""Weight-only quantised expert banks: int8 and int4 with group-wise scales, and MXFP4 (OCP
microscaling FP4, as GPT-OSS ships its experts).

Legend: E = experts, K = a projection's input width (D for ``w_in``, H for ``w_out``),
N = its output width (2H or H for ``w_in``, D for ``w_out``), G = group size, M = expert-sorted
rows, D = d_model, H = expert hidden width.

A stacked weight ``w_EKN`` (moekit's layout: ``y = x @ w[e]``) is stored output-major and grouped
along its input dimension, which is also GPT-OSS's published layout:

- ``codes``: ``(E, N, K/G, G)`` int8 (int8), or ``(E, N, K/G, G/2)`` uint8 with two 4-bit codes
  per byte, the even element in the low nibble (int4, mxfp4);
- ``scales``: ``(E, N, K/G)``: float32 (int8, int4: ``w ≈ code * scale``, symmetric, ``scale =
  absmax / 127`` or ``/ 7``), or uint8 biased exponents (mxfp4: ``w ≈ fp4(code) * 2^(scale -
  127)``, G = 32, fp4 being e2m1: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}).

The quantised grouped matmul (:func:`quantized_grouped_linear`) dequantises one expert's weight
at a time, only for experts that have rows, so the bank never exists in a wide dtype; its
backward gives the input gradient only (a quantised bank is frozen: QLoRA trains adapters on
it) and saves nothing but the codes and scales it already holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from moekit.experts.activations import Activation, apply_activation, in_projection_width
from moekit.utils.precision import autocast_off, autocast_operands
from moekit.utils.randomness import dropout_rows
from moekit.utils.validation import check_fields


class QuantFormat(str, Enum):
    """How expert weights are stored."""

    INT8 = "int8"  # 8-bit integers, one float32 scale per group
    INT4 = "int4"  # 4-bit integers (two per byte), one float32 scale per group
    MXFP4 = "mxfp4"  # OCP MX FP4 (e2m1, two per byte), one power-of-two scale per 32 values


#: the e2m1 values of the 16 four-bit codes (sign in bit 3), as the OCP MX spec and GPT-OSS
FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)
MXFP4_GROUP = 32


@dataclass(kw_only=True)
class QuantizationConfig:
    """Weight-only quantisation of a bank's two stacked weights (biases stay full precision).

    Args:
        format: ``int8``, ``int4`` or ``mxfp4``.
        group_size: consecutive input-dimension values sharing one scale; must divide both
            projections' input widths (d_model and the expert hidden width). ``mxfp4`` uses 32.
    """

    format: QuantFormat = QuantFormat.INT4
    group_size: int = 128

    def __post_init__(self) -> None:
        check_fields(self, "quantization.")
        if self.format is QuantFormat.MXFP4 and self.group_size != MXFP4_GROUP:
            raise ValueError(
                f"quantization.group_size must be {MXFP4_GROUP} for mxfp4, got {self.group_size}"
            )
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(
                f"quantization.group_size must be an even number >= 2, got {self.group_size}"
            )

    @property
    def packed(self) -> bool:
        """Two codes per byte (int4, mxfp4)."""
        return self.format is not QuantFormat.INT8

    @property
    def bits(self) -> int:
        """Bits per stored weight value (scales not counted)."""
        return 8 if self.format is QuantFormat.INT8 else 4

    def check_width(self, width: int, name: str) -> None:
        """Refuse a projection input width that the group size does not divide."""
        if width % self.group_size:
            raise ValueError(
                f"quantization.group_size={self.group_size} does not divide {name}={width}; "
                f"choose a divisor of {name}"
            )

    def shapes(self, E: int, K: int, N: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(codes shape, scales shape)`` of an ``(E, K, N)`` weight."""
        G = self.group_size
        return (E, N, K // G, G // 2 if self.packed else G), (E, N, K // G)

    def dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        """``(codes dtype, scales dtype)``."""
        codes = torch.uint8 if self.packed else torch.int8
        return codes, torch.uint8 if self.format is QuantFormat.MXFP4 else torch.float32


def _pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """``(..., G)`` values in 0..15 -> ``(..., G/2)`` uint8, the even element in the low nibble."""
    u = u.to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``(..., G/2)`` uint8 -> ``(..., G)`` uint8 codes 0..15."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def _round_to_fp4(x: torch.Tensor) -> torch.Tensor:
    """The four-bit code of the e2m1 value nearest to each of ``x`` (already scaled, so that
    |x| <= 6 after clamping); ties go to the lower magnitude."""
    magnitudes = torch.tensor(FP4_VALUES[:8], dtype=x.dtype, device=x.device)
    index = (x.abs().clamp(max=6.0).unsqueeze(-1) - magnitudes).abs().argmin(dim=-1)
    return index + 8 * (x < 0).long()


def _mxfp4_exponent(absmax: torch.Tensor) -> torch.Tensor:
    """The smallest power of two that brings each group's largest value within fp4's ±6 (the
    OCP spec's ``floor(log2(absmax)) - 2`` can clip values up to 8 to 6; this never clips)."""
    exponent = torch.ceil(torch.log2(absmax.clamp(min=2.0**-126) / 6.0))
    return exponent.clamp(-127, 127)


@torch.no_grad()
def quantize_weight(
    w_EKN: torch.Tensor, config: QuantizationConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of the stacked weight ``w_EKN`` (see the module docstring)."""
    E, K, N = w_EKN.shape
    config.check_width(K, "the input width")
    G = config.group_size
    groups = w_EKN.detach().float().transpose(1, 2).reshape(E, N, K // G, G)
    absmax = groups.abs().amax(dim=-1)
    if config.format is QuantFormat.MXFP4:
        exponent = _mxfp4_exponent(absmax)
        codes = _round_to_fp4(groups / torch.exp2(exponent).unsqueeze(-1))
        return _pack_nibbles(codes), (exponent + 127).to(torch.uint8)
    qmax = 127 if config.format is QuantFormat.INT8 else 7
    scales = absmax / qmax
    q = torch.round(groups / scales.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1))
    q = q.clamp(-qmax, qmax)
    if config.format is QuantFormat.INT8:
        return q.to(torch.int8), scales
    return _pack_nibbles(q + 8), scales


_BYTE_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _byte_table(format: QuantFormat, device: torch.device) -> torch.Tensor:
    """``(256, 2)`` float32: the two fp4 values a packed byte holds (low nibble first), so
    unpacking is one gather instead of masks, shifts, a stack and a lookup (1.7x faster for an
    MXFP4 expert here)."""
    key = (format.value, device)
    table = _BYTE_TABLES.get(key)
    if table is None:
        every_byte = torch.arange(256, dtype=torch.uint8, device="cpu")
        nibbles = _unpack_nibbles(every_byte).view(256, 2).long()
        table = torch.tensor(FP4_VALUES, dtype=torch.float32, device="cpu")[nibbles]
        table = _BYTE_TABLES[key] = table.to(device)
    return table


def dequantize_weight(
    codes: torch.Tensor,
    scales: torch.Tensor,
    config: QuantizationConfig,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The weight ``(..., K, N)`` of codes ``(..., N, K/G, G or G/2)`` and scales
    ``(..., N, K/G)`` (one expert's, or a stack's), in ``dtype``."""
    if config.format is QuantFormat.INT8:
        values = codes.to(torch.float32)
    elif config.format is QuantFormat.INT4:  # masks and shifts (measured 2.5x the gather's speed)
        values = _unpack_nibbles(codes).to(torch.float32) - 8
    else:  # (..., G/2) bytes -> (..., G/2, 2) values -> (..., G): one gather
        values = _byte_table(config.format, codes.device)[codes.long()].flatten(-2)
    if config.format is QuantFormat.MXFP4:
        multiplier = torch.exp2(scales.to(torch.float32) - 127)
    else:
        multiplier = scales.to(torch.float32)
    values = values * multiplier.unsqueeze(-1)
    return values.flatten(-2).transpose(-1, -2).to(dtype)


def _expert_spans(counts_E: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(expert, first row, rows)`` of every expert with rows (one host read of the counts)."""
    spans, start = [], 0
    for e, count in enumerate(counts_E.tolist()):
        if count:
            spans.append((e, start, count))
        start += count
    return spans


class _QuantizedGroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MK, counts_E, codes, scales, config):  # type: ignore[override]
        spans = _expert_spans(counts_E)
        y_MN = x_MK.new_zeros(x_MK.shape[0], codes.shape[1])
        for e, start, count in spans:
            w_KN = dequantize_weight(codes[e], scales[e], config, dtype=x_MK.dtype)
            torch.mm(x_MK.narrow(0, start, count), w_KN, out=y_MN.narrow(0, start, count))
        # only what the bank already holds is saved: no dequantised weight
        ctx.save_for_backward(codes, scales)
        ctx.spans, ctx.config, ctx.x_shape = spans, config, x_MK.shape
        return y_MN

    @staticmethod
    def backward(ctx, grad_y_MN):  # type: ignore[override]
        codes, scales = ctx.saved_tensors
        grad_x = grad_y_MN.new_zeros(ctx.x_shape)
        for e, start, count in ctx.spans:
            w_KN = dequantize_weight(codes[e], scales[e], ctx.config, dtype=grad_y_MN.dtype)
            torch.mm(
                grad_y_MN.narrow(0, start, count), w_KN.t(), out=grad_x.narrow(0, start, count)
            )
        return grad_x, None, None, None, None


def quantized_grouped_linear(
    x_MK: torch.Tensor,
    counts_E: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    config: QuantizationConfig,
) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ dequantize(codes[e], scales[e])`` for expert-sorted rows.

    Args:
        x_MK: ``(M, K)`` rows, expert ``e`` owning ``counts_E[e]`` consecutive rows.
        counts_E: ``(E,)`` row counts (read on the host once).
        codes, scales: the quantised ``(E, K, N)`` weight.
        config: its format and group size.

    Returns ``(M, N)`` in ``x_MK``'s dtype (the autocast dtype under autocast). Differentiable in
    ``x_MK`` only; no weight gradient exists for a quantised bank.
    """
    (x_MK,) = autocast_operands(x_MK.device, x_MK)  # type: ignore[assignment]
    with autocast_off(x_MK.device):
        return _QuantizedGroupedLinear.apply(x_MK, counts_E, codes, scales, config)


def quantized_expert_ffn(
    x_MD: torch.Tensor,
    counts_E: torch.Tensor,
    w_in: tuple[torch.Tensor, torch.Tensor],
    w_out: tuple[torch.Tensor, torch.Tensor],
    b_in_EH: torch.Tensor | None,
    b_out_ED: torch.Tensor | None,
    *,
    activation: Activation,
    quantization: QuantizationConfig,
    adapter: Any = None,
    dropout: float = 0.0,
    dropout_site: nn.Module | None = None,
) -> torch.Tensor:
    """The experts' FFN ``w_out(act(x @ w_in + b_in)) + b_out`` on expert-sorted rows, the two
    weights given as ``(codes, scales)``; an expert adapter (LoRA) adds its low-rank terms to
    each projection. ``(M, D) -> (M, D)``."""
    h_MH = quantized_grouped_linear(x_MD, counts_E, *w_in, quantization)
    expert_of_row = None
    if b_in_EH is not None:
        expert_of_row = torch.repeat_interleave(
            torch.arange(len(counts_E), device=x_MD.device), counts_E, output_size=len(x_MD)
        )
        h_MH = h_MH + b_in_EH[expert_of_row].to(h_MH.dtype)
    if adapter is not None:
        h_MH = h_MH + adapter.in_delta(x_MD, counts_E)
    a_MH = apply_activation(activation, h_MH)
    if dropout:
        a_MH = (
            nn.functional.dropout(a_MH, dropout, training=True)
            if dropout_site is None
            else dropout_rows(a_MH, dropout, dropout_site, "dropout")
        )
    y_MD = quantized_grouped_linear(a_MH, counts_E, *w_out, quantization)
    if b_out_ED is not None and expert_of_row is not None:
        y_MD = y_MD + b_out_ED[expert_of_row].to(y_MD.dtype)
    if adapter is not None:
        y_MD = y_MD + adapter.out_delta(a_MH, counts_E)
    return y_MD


class QuantizedExpertBank(nn.Module):
    """E experts whose stacked weights are quantised (``QuantizationConfig``); biases stay in
    full precision. Frozen: its weights are buffers. Same interface as ``ExpertBank``:
    ``bank(x_MD, counts_E) -> y_MD``, ``forward_one(e, x_ND)``, and an ``adapter`` slot for
    expert LoRA (QLoRA).

    Buffers: ``w_in_codes``/``w_in_scales`` (the ``(E, D, H or 2H)`` in-projection) and
    ``w_out_codes``/``w_out_scales`` (the ``(E, H, D)`` out-projection); parameters ``b_in_EH``,
    ``b_out_ED`` when ``bias``.
    """

    w_in_codes: torch.Tensor
    w_in_scales: torch.Tensor
    w_out_codes: torch.Tensor
    w_out_scales: torch.Tensor
    compute_like: torch.Tensor

    def __init__(
        self,
        quantization: QuantizationConfig,
        *,
        num_experts: int,
        d_model: int,
        hidden: int,
        activation: Activation | str = Activation.SWIGLU,
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.quantization = quantization
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.activation = Activation(activation)
        self.dropout = dropout
        self.adapter: Any = None  # an ExpertLoRA (moekit.adapters.lora), or None
        width = in_projection_width(self.activation, hidden)
        quantization.check_width(d_model, "d_model")
        quantization.check_width(hidden, "experts.hidden")
        codes_dtype, scales_dtype = quantization.dtypes()
        for name, (K, N) in (("w_in", (d_model, width)), ("w_out", (hidden, d_model))):
            codes_shape, scales_shape = quantization.shapes(num_experts, K, N)
            self.register_buffer(f"{name}_codes", torch.zeros(codes_shape, dtype=codes_dtype))
            self.register_buffer(f"{name}_scales", torch.zeros(scales_shape, dtype=scales_dtype))
        self.b_in_EH = nn.Parameter(torch.zeros(num_experts, width)) if bias else None
        self.b_out_ED = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        # follows the module's device and float dtype (.to(), .cuda(), .bfloat16()): the dtype
        # weights are dequantised into, and adapters are created in
        self.register_buffer("compute_like", torch.zeros(0), persistent=False)

    def logical_weight_count(self) -> int:
        """The full-precision weights the codes stand for: ``E · (D · width_in + H · D)``."""
        width = in_projection_width(self.activation, self.hidden)
        return self.num_experts * (self.d_model * width + self.hidden * self.d_model)

    @classmethod
    @torch.no_grad()
    def quantize(cls, bank: Any, quantization: QuantizationConfig) -> QuantizedExpertBank:
        """The quantised copy of a full-precision ``ExpertBank``."""
        out = cls(
            quantization,
            num_experts=bank.num_experts,
            d_model=bank.d_model,
            hidden=bank.hidden,
            activation=bank.activation,
            bias=bank.b_in_EH is not None,
            dropout=bank.dropout,
        ).to(bank.w_in_EDH.device)
        for name, weight in (("w_in", bank.w_in_EDH), ("w_out", bank.w_out_EHD)):
            codes, scales = quantize_weight(weight, quantization)
            getattr(out, f"{name}_codes").copy_(codes)
            getattr(out, f"{name}_scales").copy_(scales)
        if bank.b_in_EH is not None and out.b_in_EH is not None and out.b_out_ED is not None:
            out.b_in_EH.copy_(bank.b_in_EH.float())
            out.b_out_ED.copy_(bank.b_out_ED.float())
        return out.to(bank.w_in_EDH.dtype)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``.to(dtype)`` moves the float32 group scales but keeps them float32 (a bf16 scale
        would add its own rounding to every weight)."""
        kept = {
            name: buffer
            for name, buffer in self._buffers.items()
            if name.endswith("_scales") and buffer is not None and buffer.is_floating_point()
        }
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype the weights are dequantised into outside autocast."""
        return self.compute_like.dtype

    def dequantized_weights(
        self, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_in_EDH, w_out_EHD)`` in full precision (for references and for going back to an
        ``ExpertBank``; the forward never builds these)."""
        dtype = dtype or self.dtype
        q = self.quantization
        return (
            dequantize_weight(self.w_in_codes, self.w_in_scales, q, dtype=dtype),
            dequantize_weight(self.w_out_codes, self.w_out_scales, q, dtype=dtype),
        )

    @property
    def weight_bytes(self) -> int:
        """Bytes of the codes and scales (what the bank's weights take in memory)."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.w_in_codes, self.w_in_scales, self.w_out_codes, self.w_out_scales)
        )

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """``(M, D)`` expert-sorted rows -> ``(M, D)``; see ``ExpertBank.forward``."""
        if not torch.is_autocast_enabled(x_MD.device.type) and x_MD.dtype != self.dtype:
            raise TypeError(f"x dtype {x_MD.dtype} differs from the bank's dtype {self.dtype}")
        return quantized_expert_ffn(
            x_MD,
            counts_E,
            (self.w_in_codes, self.w_in_scales),
            (self.w_out_codes, self.w_out_scales),
            self.b_in_EH,
            self.b_out_ED,
            activation=self.activation,
            quantization=self.quantization,
            adapter=self.adapter if self.adapter is not None and self.adapter.active else None,
            dropout=self.dropout if self.training else 0.0,
            dropout_site=self,
        )

    def forward_one(self, expert: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``expert`` alone on ``x_ND``, from its dequantised weights (the reference)."""
        q = self.quantization
        w_in = dequantize_weight(self.w_in_codes[expert], self.w_in_scales[expert], q)
        w_out = dequantize_weight(self.w_out_codes[expert], self.w_out_scales[expert], q)
        h = x_ND @ w_in.to(x_ND.dtype)
        if self.b_in_EH is not None:
            h = h + self.b_in_EH[expert]
        y = apply_activation(self.activation, h) @ w_out.to(x_ND.dtype)
        if self.b_out_ED is not None:
            y = y + self.b_out_ED[expert]
        return y

    def extra_repr(self) -> str:
        q = self.quantization
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}, "
            f"activation={self.activation.value}, format={q.format.value}, "
            f"group_size={q.group_size}, bias={self.b_in_EH is not None}"
        )


def quantization_error_bound(w_EKN: torch.Tensor, config: QuantizationConfig) -> float:
    """The largest error a weight element can have after quantisation: half a step of its
    group (int), or half the gap between neighbouring fp4 values times the group's scale."""
    E, K, N = w_EKN.shape
    G = config.group_size
    absmax = w_EKN.detach().float().transpose(1, 2).reshape(E, N, K // G, G).abs().amax(-1)
    if config.format is QuantFormat.MXFP4:  # the largest gap between fp4 values is 2 (4 -> 6)
        return float(torch.exp2(_mxfp4_exponent(absmax)).max()) * (1 + 1e-6)
    qmax = 127 if config.format is QuantFormat.INT8 else 7
    return float((absmax / qmax / 2).max()) * (1 + 1e-6) + math.ulp(1.0)
