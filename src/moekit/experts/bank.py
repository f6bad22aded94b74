"""Expert banks: the routed experts of an MoE layer.

Legend: M = expert-sorted rows (token-expert assignments), D = d_model, H = expert hidden width,
E = experts, N = rows given to a single expert.

Every bank has the same interface, so the dispatcher never cares which one it holds:
``bank(x_MD, counts_E) -> y_MD`` for rows sorted by expert, and ``bank.forward_one(e, x_ND)`` that
runs expert ``e`` alone (used by the looped reference and by readers who want the math).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from moekit.experts.activations import Activation, apply_activation, in_projection_width
from moekit.experts.fused_ffn import expert_ffn
from moekit.experts.grouped_linear import grouped_linear
from moekit.experts.grouped_matmul import GroupedMatmulKernel
from moekit.experts.quantized import QuantizationConfig, QuantizedExpertBank
from moekit.utils.randomness import dropout_rows
from moekit.utils.validation import check_fields


class ExpertAdapter(Protocol):
    """What an expert bank's adapter adds to each projection (``moekit.adapters.lora``)."""

    @property
    def active(self) -> bool:
        """False once merged into the weights."""
        ...

    def in_delta(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """``(M, H or 2H)`` added to the pre-activations."""
        ...

    def out_delta(self, a_MH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """``(M, D)`` added to the outputs."""
        ...


@dataclass(kw_only=True)
class ExpertConfig:
    """Shape of each routed expert: a two-layer FFN ``w_out(act(x @ w_in))``.

    Args:
        hidden: expert hidden width H (the gated activations use ``2H`` columns in ``w_in``).
        activation: ``relu``, ``gelu``, ``silu``, ``swiglu`` or ``geglu``.
        bias: add a bias after each projection.
        kernel: the experts' kernels: ``auto``, ``grouped_mm`` or ``loop`` (the PyTorch path),
            ``triton`` (moekit's fused kernels) or ``liger`` (Liger-Kernel's fused MoE):
            ``moekit.experts.backends``.
        dropout: dropout on each expert's hidden activations while training ("expert dropout",
            Fedus et al. 2021, Switch Transformers' fine-tuning recipe); 0 keeps the fused path.
        quantization: store the experts' weights quantised (int8, int4 or mxfp4; frozen,
            ``moekit.experts.quantized``), or ``None`` for full precision.
    """

    hidden: int
    activation: Activation = Activation.SWIGLU
    bias: bool = False
    kernel: GroupedMatmulKernel = GroupedMatmulKernel.AUTO
    dropout: float = 0.0
    quantization: QuantizationConfig | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"experts.dropout must be in [0, 1), got {self.dropout}")

    def build(self, *, num_experts: int, d_model: int) -> ExpertBank | QuantizedExpertBank:
        """The bank of ``num_experts`` experts of width ``d_model`` (a ``QuantizedExpertBank``,
        its codes zero until loaded, when ``quantization`` is set)."""
        if self.quantization is not None:
            return QuantizedExpertBank(
                self.quantization,
                num_experts=num_experts,
                d_model=d_model,
                hidden=self.hidden,
                activation=self.activation,
                bias=self.bias,
                dropout=self.dropout,
            )
        return ExpertBank(
            num_experts,
            d_model,
            self.hidden,
            activation=self.activation,
            bias=self.bias,
            kernel=self.kernel,
            dropout=self.dropout,
        )


class ExpertBank(nn.Module):
    """E feed-forward experts with stacked weights, computed with one grouped matmul per layer.

    Parameters: ``w_in_EDH`` ``(E, D, H or 2H)``, ``w_out_EHD`` ``(E, H, D)``, and optional biases
    ``b_in_EH``, ``b_out_ED``. Initialisation matches ``nn.Linear``: weights and biases uniform in
    ``±1/sqrt(fan_in)``, so an expert is initialised like a dense FFN of the same shape.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        hidden: int,
        *,
        activation: Activation | str = Activation.SWIGLU,
        bias: bool = False,
        kernel: GroupedMatmulKernel | str = GroupedMatmulKernel.AUTO,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.dropout = dropout
        # a low-rank adapter on both projections (``moekit.adapters.lora.ExpertLoRA``), or None
        self.adapter: ExpertAdapter | None = None
        self.d_model = d_model
        self.hidden = hidden
        self.activation = Activation(activation)
        self.kernel = GroupedMatmulKernel(kernel)
        width = in_projection_width(self.activation, hidden)
        self.w_in_EDH = nn.Parameter(torch.empty(num_experts, d_model, width))
        self.w_out_EHD = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.b_in_EH = nn.Parameter(torch.empty(num_experts, width)) if bias else None
        self.b_out_ED = nn.Parameter(torch.empty(num_experts, d_model)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the weights as ``nn.Linear`` would: uniform in +-1/sqrt(fan_in)."""
        bound_in = 1.0 / math.sqrt(self.d_model)
        bound_out = 1.0 / math.sqrt(self.hidden)
        nn.init.uniform_(self.w_in_EDH, -bound_in, bound_in)
        nn.init.uniform_(self.w_out_EHD, -bound_out, bound_out)
        if self.b_in_EH is not None and self.b_out_ED is not None:
            nn.init.uniform_(self.b_in_EH, -bound_in, bound_in)
            nn.init.uniform_(self.b_out_ED, -bound_out, bound_out)

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Run rows sorted by expert through their experts.

        Args:
            x_MD: ``(M, D)`` rows, expert ``e`` owning ``counts_E[e]`` consecutive rows.
            counts_E: ``(E,)`` integer counts summing to ``M``.

        Returns:
            ``(M, D)``.
        """
        adapter = self.adapter if self.adapter is not None and self.adapter.active else None
        dropout = self.dropout if self.training else 0.0
        if adapter is None and not dropout:
            return expert_ffn(
                x_MD,
                counts_E,
                self.w_in_EDH,
                self.w_out_EHD,
                b_in_EH=self.b_in_EH,
                b_out_ED=self.b_out_ED,
                activation=self.activation,
                kernel=self.kernel,
            )
        return self._forward_in_pieces(x_MD, counts_E, adapter, dropout)

    def _forward_in_pieces(
        self,
        x_MD: torch.Tensor,
        counts_E: torch.Tensor,
        adapter: ExpertAdapter | None,
        dropout: float,
    ) -> torch.Tensor:
        """The FFN as separate differentiable grouped matmuls, with the adapter's low-rank terms
        added to each projection and dropout on the hidden activations."""
        h_MH = grouped_linear(x_MD, self.w_in_EDH, counts_E, self.kernel)
        expert_of_row = None
        if self.b_in_EH is not None:
            expert_of_row = torch.repeat_interleave(
                torch.arange(self.num_experts, device=x_MD.device), counts_E, output_size=len(x_MD)
            )
            h_MH = h_MH + self.b_in_EH[expert_of_row].to(h_MH.dtype)
        if adapter is not None:
            h_MH = h_MH + adapter.in_delta(x_MD, counts_E)
        a_MH = apply_activation(self.activation, h_MH)
        if dropout:
            a_MH = dropout_rows(a_MH, dropout, self, "dropout")
        y_MD = grouped_linear(a_MH, self.w_out_EHD, counts_E, self.kernel)
        if self.b_out_ED is not None:
            y_MD = y_MD + self.b_out_ED[expert_of_row].to(y_MD.dtype)
        if adapter is not None:
            y_MD = y_MD + adapter.out_delta(a_MH, counts_E)
        return y_MD

    @torch.no_grad()
    def select_experts(self, first: int, count: int) -> ExpertBank:
        """A bank of experts ``first .. first+count-1`` of this one (copies of their weights);
        expert parallelism keeps each rank's slice this way."""
        if not (first >= 0 and count >= 1 and first + count <= self.num_experts):
            raise ValueError(
                f"experts {first}..{first + count - 1} are not all in this bank of "
                f"{self.num_experts}"
            )
        with torch.device(self.w_in_EDH.device):  # meta stays meta (planning at scale)
            bank = ExpertBank(
                count,
                self.d_model,
                self.hidden,
                activation=self.activation,
                bias=self.b_in_EH is not None,
                kernel=self.kernel,
                dropout=self.dropout,
            ).to(self.w_in_EDH.dtype)
        for name, param in bank.named_parameters():
            param.copy_(getattr(self, name).narrow(0, first, count))
        return bank

    def quantized(self, quantization: QuantizationConfig) -> QuantizedExpertBank:
        """A quantised copy of this bank (its weights as ``quantization`` stores them)."""
        return QuantizedExpertBank.quantize(self, quantization)

    @classmethod
    @torch.no_grad()
    def dequantized(cls, bank: QuantizedExpertBank) -> ExpertBank:
        """A full-precision bank with ``bank``'s dequantised weights (and biases)."""
        w_in, w_out = bank.dequantized_weights()
        out = cls(
            bank.num_experts,
            bank.d_model,
            bank.hidden,
            activation=bank.activation,
            bias=bank.b_in_EH is not None,
            dropout=bank.dropout,
        ).to(w_in.device, w_in.dtype)
        out.w_in_EDH.copy_(w_in)
        out.w_out_EHD.copy_(w_out)
        if bank.b_in_EH is not None and bank.b_out_ED is not None:
            assert out.b_in_EH is not None and out.b_out_ED is not None
            out.b_in_EH.copy_(bank.b_in_EH)
            out.b_out_ED.copy_(bank.b_out_ED)
        return out

    def forward_one(self, expert: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``expert`` alone on ``x_ND`` ``(N, D)``; the plain math, for references."""
        h = x_ND @ self.w_in_EDH[expert]
        if self.b_in_EH is not None:
            h = h + self.b_in_EH[expert]
        y = apply_activation(self.activation, h) @ self.w_out_EHD[expert]
        if self.b_out_ED is not None:
            y = y + self.b_out_ED[expert]
        return y

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}, "
            f"activation={self.activation.value}, bias={self.b_in_EH is not None}"
        )


class ModuleExperts(nn.Module):
    """Any modules as experts (each maps ``(N, D) -> (N, D)``), even MoE layers; looped, slower.

    An expert that returns an object with an ``output`` attribute (a moekit ``MoEOutput``) is
    unwrapped, so an MoE layer can serve as an expert (hierarchical MoE).
    """

    def __init__(self, experts: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(experts) < 1:
            raise ValueError("experts must hold at least one module")
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(self.experts)
        self._inner_outputs: list[Any] = []

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        self._inner_outputs = []
        chunks = torch.split(x_MD, counts_E.tolist())
        outputs = [self.forward_one(e, chunk) for e, chunk in enumerate(chunks) if len(chunk)]
        return torch.cat(outputs) if outputs else x_MD.new_zeros(x_MD.shape)

    def forward_one(self, expert: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Module ``expert`` on ``x_ND`` ``(N, D)`` (an MoE expert's output is kept)."""
        y = self.experts[expert](x_ND)
        if hasattr(y, "output"):  # an MoE layer as an expert: keep its losses and statistics
            self._inner_outputs.append(y)
            return y.output
        return y

    def take_inner_outputs(self) -> list[Any]:
        """The ``MoEOutput`` of every MoE expert called since the last forward, then forget
        them (the outer layer adds their auxiliary losses to its own)."""
        outputs, self._inner_outputs = self._inner_outputs, []
        return outputs
