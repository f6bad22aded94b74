"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on moekit models,
including the stacked routed experts.

A targeted weight ``W`` is used as ``W + (alpha / r) · A B`` without ever forming ``A B`` in the
forward pass: a linear layer adds ``(alpha / r) · (dropout(x) A) B``, and an expert bank adds, for
each expert ``e``, ``(alpha / r) · (x A_e) B_e`` computed on the same expert-sorted rows as the
grouped GEMM (two thin grouped matmuls per projection). ``B`` starts at zero, so a fresh adapter
leaves the model's function unchanged.

Legend: D = d_model, H = expert hidden width (W = 2H columns for gated activations), E = experts,
R = rank, M = expert-sorted rows.

``merge_lora`` folds every adapter into its weights (the fused expert path runs again) and keeps
the weights it replaced, so ``unmerge_lora`` restores them bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from moekit.experts.activations import in_projection_width
from moekit.experts.bank import ExpertBank
from moekit.experts.dense import FeedForward
from moekit.experts.grouped_linear import grouped_linear
from moekit.experts.grouped_matmul import GroupedMatmulKernel
from moekit.experts.quantized import QuantizedExpertBank
from moekit.experts.shared import SharedExperts
from moekit.layers import MoE
from moekit.utils.validation import check_fields

#: Target groups: ``attention`` (every projection of the attention blocks), ``experts`` (routed
#: expert banks), ``shared_experts``, ``ffn`` (the dense FFN layers); single projections can be
#: named too (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ...).
TARGET_GROUPS = ("attention", "recurrent_mixers", "experts", "shared_experts", "ffn")


@dataclass(kw_only=True)
class LoRAConfig:
    """Which weights get adapters and how large.

    Args:
        rank: R, the default rank.
        alpha: scale numerator (the update is ``alpha / rank · A B``).
        dropout: dropout on the adapter's input while training.
        targets: target groups (``TARGET_GROUPS``) and/or projection names (``q_proj``).
        ranks: per-target ranks overriding ``rank`` (``{"experts": 4}``); alpha stays the same.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention", "experts"])
    ranks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self)
        for name, rank in {"rank": self.rank, **self.ranks}.items():
            if rank < 1:
                raise ValueError(f"lora rank must be >= 1, got {name}={rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError(f"lora.targets is empty; choose from {', '.join(TARGET_GROUPS)}")
        unknown = set(self.ranks) - set(self.targets)
        if unknown:
            raise ValueError(f"lora.ranks names targets not in lora.targets: {sorted(unknown)}")

    def rank_of(self, target: str) -> int:
        """The rank for ``target`` (``rank_overrides`` where given, else ``rank``)."""
        return self.ranks.get(target, self.rank)

    def build(self, *, model: nn.Module) -> nn.Module:
        """``model`` with adapters attached in place (``add_lora``): every other parameter is
        frozen and the config kept as ``model.lora_config``. Returns ``model``."""
        add_lora(model, self)
        return model


def _kaiming_uniform(tensor: torch.Tensor, fan_in: int) -> None:
    # as nn.Linear (and PEFT) initialise A: uniform in ±1/sqrt(fan_in)
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(tensor, -bound, bound)


class LoRALinear(nn.Module):
    """``nn.Linear`` with a low-rank update: ``x W^T + b + s · (dropout(x) A^T) B^T``.

    Keeps the original layer's ``weight`` and ``bias`` parameters under the same names, so state
    dicts stay compatible; ``lora_A`` is ``(R, in)``, ``lora_B`` ``(out, R)`` (PEFT's layout).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        _kaiming_uniform(self.lora_A, base.in_features)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self._replaced: torch.Tensor | None = None  # the weight before merge_lora

    @property
    def active(self) -> bool:
        return self._replaced is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)
        if not self.active:
            return y
        low_rank = nn.functional.linear(self.lora_dropout(x), self.lora_A)
        return y + self.scaling * nn.functional.linear(low_rank, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """``(out, in)``: ``s · B A``."""
        return self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the low-rank update into the base weight (the adapter goes idle)."""
        if self.active:
            self._replaced = self.weight.detach().clone()
            self.weight.add_(self.delta_weight().to(self.weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the folded update back out of the base weight (the adapter is active again)."""
        if self._replaced is not None:
            self.weight.copy_(self._replaced)
            self._replaced = None

    def extra_repr(self) -> str:
        rank = self.lora_A.shape[0]
        return f"in={self.in_features}, out={self.out_features}, rank={rank}, scale={self.scaling}"


class ExpertLoRA(nn.Module):
    """Low-rank updates of every routed expert's two projections, attached to an
    :class:`ExpertBank` as ``bank.adapter``.

    Parameters: ``A_in_EDR`` ``(E, D, R)``, ``B_in_ERW`` ``(E, R, W)``, ``A_out_EHR``
    ``(E, H, R)``, ``B_out_ERD`` ``(E, R, D)``; expert ``e``'s input projection becomes
    ``w_in[e] + s · A_in[e] B_in[e]`` and its output projection ``w_out[e] + s · A_out[e]
    B_out[e]``.
    """

    def __init__(
        self, bank: ExpertBank | QuantizedExpertBank, rank: int, alpha: float, dropout: float
    ) -> None:
        super().__init__()
        E, D, H = bank.num_experts, bank.d_model, bank.hidden
        W = in_projection_width(bank.activation, H)
        # on a quantised bank (QLoRA) the adapters take the dtype its weights dequantise into
        like = bank.w_in_EDH if isinstance(bank, ExpertBank) else bank.compute_like
        self.scaling = alpha / rank
        self.kernel = bank.kernel if isinstance(bank, ExpertBank) else GroupedMatmulKernel.AUTO
        self.A_in_EDR = nn.Parameter(like.new_empty(E, D, rank))
        self.B_in_ERW = nn.Parameter(like.new_zeros(E, rank, W))
        self.A_out_EHR = nn.Parameter(like.new_empty(E, H, rank))
        self.B_out_ERD = nn.Parameter(like.new_zeros(E, rank, D))
        _kaiming_uniform(self.A_in_EDR, D)
        _kaiming_uniform(self.A_out_EHR, H)
        self.dropout = dropout
        self._replaced: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def active(self) -> bool:
        return self._replaced is None

    def _low_rank(
        self, x_MK: torch.Tensor, A: torch.Tensor, B: torch.Tensor, counts_E: torch.Tensor
    ) -> torch.Tensor:
        if self.dropout and self.training:
            x_MK = nn.functional.dropout(x_MK, self.dropout, training=True)
        x_MR = grouped_linear(x_MK, A, counts_E, self.kernel)
        return self.scaling * grouped_linear(x_MR, B, counts_E, self.kernel)

    def in_delta(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """``(M, 2H or H)``: the adapter's addition to the in-projection of expert-sorted rows."""
        return self._low_rank(x_MD, self.A_in_EDR, self.B_in_ERW, counts_E)

    def out_delta(self, a_MH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """``(M, D)``: the adapter's addition to the out-projection of expert-sorted rows."""
        return self._low_rank(a_MH, self.A_out_EHR, self.B_out_ERD, counts_E)

    def delta_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E, D, W)`` and ``(E, H, D)``: the updates ``s · A B`` of each expert."""
        return (
            self.scaling * torch.bmm(self.A_in_EDR, self.B_in_ERW),
            self.scaling * torch.bmm(self.A_out_EHR, self.B_out_ERD),
        )

    @torch.no_grad()
    def merge(self, bank: ExpertBank) -> None:
        """Fold every expert's low-rank update into ``bank``'s stacked weights."""
        if not isinstance(bank, ExpertBank):
            raise ValueError(
                "LoRA cannot be merged into quantised experts (the sum is not representable in "
                "the quantised format); export the adapters (moekit.interop.to_peft), or load "
                "the full-precision model and merge there"
            )
        if self.active:
            self._replaced = (bank.w_in_EDH.detach().clone(), bank.w_out_EHD.detach().clone())
            d_in, d_out = self.delta_weights()
            bank.w_in_EDH.add_(d_in.to(bank.w_in_EDH.dtype))
            bank.w_out_EHD.add_(d_out.to(bank.w_out_EHD.dtype))

    @torch.no_grad()
    def unmerge(self, bank: ExpertBank) -> None:
        """Take the folded updates back out of ``bank``'s stacked weights."""
        if self._replaced is not None:
            bank.w_in_EDH.copy_(self._replaced[0])
            bank.w_out_EHD.copy_(self._replaced[1])
            self._replaced = None

    def extra_repr(self) -> str:
        E, D, R = self.A_in_EDR.shape
        return f"experts={E}, d_model={D}, rank={R}, scale={self.scaling}"


class DenseLoRA(nn.Module):
    """Low-rank updates of a dense FFN's two projections (the dense FFN layers, shared
    experts), attached as ``ffn.adapter``: ``A_in_DR``, ``B_in_RW``, ``A_out_HR``, ``B_out_RD``."""

    def __init__(self, ffn: FeedForward, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        D, W = ffn.w_in_DH.shape
        H = ffn.w_out_HD.shape[0]
        like = ffn.w_in_DH
        self.scaling = alpha / rank
        self.A_in_DR = nn.Parameter(like.new_empty(D, rank))
        self.B_in_RW = nn.Parameter(like.new_zeros(rank, W))
        self.A_out_HR = nn.Parameter(like.new_empty(H, rank))
        self.B_out_RD = nn.Parameter(like.new_zeros(rank, D))
        _kaiming_uniform(self.A_in_DR, D)
        _kaiming_uniform(self.A_out_HR, H)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self._replaced: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def active(self) -> bool:
        return self._replaced is None

    def in_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's addition to the dense FFN's in-projection of ``x``."""
        return self.scaling * ((self.lora_dropout(x) @ self.A_in_DR) @ self.B_in_RW)

    def out_delta(self, a: torch.Tensor) -> torch.Tensor:
        """The adapter's addition to the dense FFN's out-projection of the activation ``a``."""
        return self.scaling * ((self.lora_dropout(a) @ self.A_out_HR) @ self.B_out_RD)

    @torch.no_grad()
    def merge(self, ffn: FeedForward) -> None:
        """Fold the low-rank updates into ``ffn``'s weights."""
        if self.active:
            self._replaced = (ffn.w_in_DH.detach().clone(), ffn.w_out_HD.detach().clone())
            ffn.w_in_DH.add_(self.scaling * self.A_in_DR @ self.B_in_RW)
            ffn.w_out_HD.add_(self.scaling * self.A_out_HR @ self.B_out_RD)

    @torch.no_grad()
    def unmerge(self, ffn: FeedForward) -> None:
        """Take the folded updates back out of ``ffn``'s weights."""
        if self._replaced is not None:
            ffn.w_in_DH.copy_(self._replaced[0])
            ffn.w_out_HD.copy_(self._replaced[1])
            self._replaced = None


def _groups_of(model: nn.Module) -> dict[str, list[tuple[nn.Module, str, nn.Module]]]:
    """``target -> [(parent, attribute, module)]`` for every adaptable module."""
    found: dict[str, list[tuple[nn.Module, str, nn.Module]]] = {}
    moe_parts = {id(sub) for m in model.modules() if isinstance(m, MoE) for sub in m.modules()}
    for module in model.modules():
        mixer = getattr(type(module), "token_mixer", None)  # found by marker, not class
        if mixer is not None and getattr(type(module), "lora_on_linears", True):
            target = "attention" if mixer == "attention" else "recurrent_mixers"
            excluded = getattr(type(module), "lora_excluded", ())
            for name, child in module.named_children():
                if isinstance(child, nn.Linear) and name not in excluded:
                    found.setdefault(target, []).append((module, name, child))
                    found.setdefault(name, []).append((module, name, child))
        elif isinstance(module, MoE):
            if isinstance(module.experts, ExpertBank | QuantizedExpertBank):
                found.setdefault("experts", []).append((module, "experts", module.experts))
            if isinstance(module.shared_experts, SharedExperts):
                ffn = module.shared_experts.ffn
                found.setdefault("shared_experts", []).append((module.shared_experts, "ffn", ffn))
        elif isinstance(module, FeedForward) and id(module) not in moe_parts:
            found.setdefault("ffn", []).append((model, "", module))
    return found


def add_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Attach adapters to ``model`` in place and freeze every other parameter; returns the names
    of the adapted modules. Raises when a target matches nothing in the model. The config is
    kept as ``model.lora_config``: checkpoints save it and ``from_pretrained`` re-attaches."""
    if any(isinstance(m, LoRALinear | ExpertLoRA) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters")
    groups = _groups_of(model)
    missing = [t for t in config.targets if t not in groups]
    if missing:
        raise ValueError(
            f"lora.targets {missing} match no module of this model; it has: "
            f"{', '.join(sorted(groups))}"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    setattr(model, "lora_config", config)  # noqa: B010 (any nn.Module, not only TransformerLM)
    names = {id(m): n for n, m in model.named_modules()}
    adapted: list[str] = []
    for target in config.targets:
        rank = config.rank_of(target)
        for parent, attribute, module in groups[target]:
            if isinstance(module, ExpertBank | QuantizedExpertBank):
                if module.adapter is None:
                    module.adapter = ExpertLoRA(module, rank, config.alpha, config.dropout)
                    adapted.append(names[id(module)])
            elif isinstance(module, FeedForward):
                if module.adapter is None:
                    module.adapter = DenseLoRA(module, rank, config.alpha, config.dropout)
                    adapted.append(names[id(module)])
            elif isinstance(module, nn.Linear) and getattr(parent, attribute) is module:
                setattr(parent, attribute, LoRALinear(module, rank, config.alpha, config.dropout))
                adapted.append(names[id(module)])
    return adapted


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' parameters by name (what a LoRA run trains and saves)."""
    return {
        name: p
        for name, p in model.named_parameters()
        if ".lora_A" in name or ".lora_B" in name or ".adapter." in name
    }


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weights (keeping the replaced weights for ``unmerge_lora``);
    the adapters stay attached but inactive, and the fused expert path runs again."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.merge()
        elif (
            isinstance(module, ExpertBank | QuantizedExpertBank | FeedForward)
            and module.adapter is not None
        ):
            cast(ExpertLoRA | DenseLoRA, module.adapter).merge(module)  # type: ignore[arg-type]


def unmerge_lora(model: nn.Module) -> None:
    """Restore the weights ``merge_lora`` replaced, exactly (bit for bit)."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.unmerge()
        elif isinstance(module, ExpertBank | FeedForward) and module.adapter is not None:
            cast(ExpertLoRA | DenseLoRA, module.adapter).unmerge(module)  # type: ignore[arg-type]


def remove_lora(model: nn.Module) -> None:
    """Merge every adapter into its weights and take the adapters off (PEFT's
    ``merge_and_unload``): a plain model again, whose checkpoints hold no adapter. Quantised
    experts' adapters cannot be folded into their codes and are refused."""
    if any(isinstance(m, QuantizedExpertBank) and m.adapter is not None for m in model.modules()):
        raise ValueError(
            "the quantised experts carry LoRA adapters (QLoRA), which cannot be folded into "
            "their codes: keep them as adapters, or merge into the full-precision model"
        )
    merge_lora(model)
    for parent in list(model.modules()):
        for attribute, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    device=child.weight.device,
                    dtype=child.weight.dtype,
                )
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, attribute, plain)
        if isinstance(parent, ExpertBank | FeedForward) and parent.adapter is not None:
            parent.adapter = None
    if getattr(model, "lora_config", None) is not None:
        setattr(model, "lora_config", None)  # noqa: B010 (any nn.Module)
