"""AdamW parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.training.config import OptimConfig
from moekit.training.presets import EXPERT_MASK


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # norms and biases are vectors; router biases too (a bias-balancing router's selection bias
    # is a buffer and never reaches the optimizer)
    # a partly trained expert tensor too: decay would move its frozen experts
    return (
        param.dim() < 2
        or name.endswith("bias")
        or name.endswith("bias_E")
        or hasattr(param, EXPERT_MASK)
    )


def build_optimizer(
    model: nn.Module, config: OptimConfig, *, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices only.

    ``fused``: torch's fused AdamW kernel (one launch for all parameters, and no host read of
    the step count); ``None`` uses it when every trained parameter is on a CUDA device.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if fused is None:
        fused = all(p.device.type == "cuda" for p in decay + no_decay) and bool(decay + no_decay)
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=fused or None,
    )


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up, then cosine to ``min_lr_ratio``."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(total_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, config: OptimConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, config)
    )
