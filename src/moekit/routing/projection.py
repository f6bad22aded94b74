"""The router projection shared by the learned routers: ``x W^T (+ b)`` in at least float32."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from moekit.utils.precision import autocast_off


def router_dtype(x: torch.Tensor, float32: bool) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32) if float32 else x.dtype


def new_router_weight(d_model: int, num_experts: int, bias: bool = False):
    """``(E, D)`` weight (and ``(E,)`` bias) initialised like ``nn.Linear``."""
    proj = nn.Linear(d_model, num_experts, bias=bias)
    weight = nn.Parameter(proj.weight.detach().clone())
    return weight, (nn.Parameter(proj.bias.detach().clone()) if bias else None)


def linear_logits(
    x_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor | None, float32: bool = True
) -> torch.Tensor:
    """``(T, D) -> (T, E)`` logits, computed in at least float32 when ``float32`` (with
    autocast off: ``F.linear`` would otherwise be autocast to bf16)."""
    dtype = router_dtype(x_TD, float32)
    bias = None if bias_E is None else bias_E.to(dtype)
    with router_precision(x_TD.device, float32):
        return F.linear(x_TD.to(dtype), weight_ED.to(dtype), bias)


def router_precision(device: torch.device, float32: bool) -> contextlib.AbstractContextManager:
    """The block a router computes in: autocast off on ``device`` when the router asks for
    float32 math (so top-k is chosen on fp32 logits and losses see fp32 probabilities), else
    whatever autocast is in force."""
    if not float32:
        return contextlib.nullcontext()
    return autocast_off(device)
