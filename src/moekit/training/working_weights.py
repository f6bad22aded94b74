"""bf16 working copies of a model's matrix weights, with its fp32 parameters as the masters.

Under bf16 autocast every forward casts each fp32 matrix weight to bf16 again (once per
micro-batch, and again when activation checkpointing recomputes a block), and every backward
casts its bf16 gradient back to fp32, one kernel per parameter each way. With working weights
the model computes with bf16 copies kept between steps: the forward casts nothing, the
gradients land on the copies and are added into the fp32 masters' gradients in one multi-tensor
pass per micro-batch, and after the optimizer step one more pass refreshes the copies from the
masters. The optimizer, the checkpoints and evaluation see only the fp32 parameters.

The numbers are those of autocast: a copy is the master rounded to bf16, exactly the cast
autocast makes, and its gradient is the bf16 gradient autocast would cast to fp32. Only
weights that autocast would cast to bf16 get a copy: the weights and biases of ``nn.Linear``
layers and the matrices of the dense and expert feed-forwards. Routers (computed in fp32 by
design, ST-MoE §2.4), norms, embeddings and every other parameter stay fp32 and are cast, or
not, by autocast as before. ``tests/training/test_working_weights.py`` checks a step equal to
autocast's to the bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from moekit.experts.bank import ExpertBank
from moekit.experts.dense import FeedForward
from moekit.routing.config import RouterBase

__all__ = ["WorkingWeights", "matrix_weights"]

#: the parameters each module type computes with in bf16 matrix products under autocast
_MATRIX_PARAMETERS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("weight", "bias"),
    FeedForward: ("w_in_DH", "w_out_HD"),
    ExpertBank: ("w_in_EDH", "w_out_EHD"),
}


def matrix_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, parameter name)`` of every floating-point parameter of ``model`` that feeds
    only bf16 matrix products under autocast (see the module docstring), routers excepted."""
    found: list[tuple[nn.Module, str]] = []
    routers = [m for m in model.modules() if isinstance(m, RouterBase)]
    inside_router = {id(m) for router in routers for m in router.modules()}
    for module in model.modules():
        if id(module) in inside_router:
            continue
        names = _MATRIX_PARAMETERS.get(type(module), ())
        for name in names:
            param = module._parameters.get(name)
            if param is not None and param.is_floating_point():
                found.append((module, name))
    return found


@dataclass
class _Slot:
    module: nn.Module
    name: str
    master: nn.Parameter
    working: nn.Parameter


class WorkingWeights:
    """bf16 working copies of ``model``'s matrix weights (:func:`matrix_weights`).

    Use: ``with weights.swapped():`` around each micro-batch's forward and backward (the model
    computes with the copies, autocast still on for everything else), then
    :meth:`move_gradients` after each backward, and :meth:`refresh` after each optimizer step
    (and after anything else writes the masters: a checkpoint load, ``moekit grow``).

    Args:
        model: the model; its parameters stay the fp32 masters.
        dtype: the working precision.
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype = torch.bfloat16) -> None:
        self.dtype = dtype
        self._slots: list[_Slot] = []
        for module, name in matrix_weights(model):
            master = module._parameters[name]
            assert master is not None
            if master.dtype == dtype:
                continue  # already in the working precision: nothing to cast
            working = nn.Parameter(master.detach().to(dtype), requires_grad=master.requires_grad)
            self._slots.append(_Slot(module, name, master, working))
        self._trainable = [slot for slot in self._slots if slot.master.requires_grad]

    def __len__(self) -> int:
        return len(self._slots)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The model computes with the working copies inside this block (forward and backward:
        activation checkpointing recomputes with them too)."""
        for slot in self._slots:
            slot.module._parameters[slot.name] = slot.working
        try:
            yield
        finally:
            for slot in self._slots:
                slot.module._parameters[slot.name] = slot.master

    def move_gradients(self) -> None:
        """Add the working copies' gradients into the masters' (fp32) gradients and free them:
        one multi-tensor pass for the masters that have a gradient, one for those that get their
        first. A master's gradient hooks (``Tensor.register_hook``: the expert masks of the
        ``experts:<selection>`` fine-tuning presets) see its fp32 gradient, as under
        autocast."""
        adding: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        starting: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for slot in self._trainable:
            grad = slot.working.grad
            if grad is None:
                continue
            hooks = slot.master._backward_hooks
            if hooks:  # what autograd would have called on the master's own gradient
                grad = grad.to(slot.master.dtype)
                for hook in hooks.values():
                    changed = hook(grad)
                    grad = grad if changed is None else changed
            if slot.master.grad is None:
                slot.master.grad = torch.empty_like(slot.master)
                starting[0].append(slot.master.grad)
                starting[1].append(grad)
            else:
                adding[0].append(slot.master.grad)
                adding[1].append(grad)
            slot.working.grad = None
        with torch.no_grad():
            if starting[0]:
                torch._foreach_copy_(starting[0], starting[1])
            if adding[0]:
                torch._foreach_add_(adding[0], adding[1])

    @torch.no_grad()
    def refresh(self, *, trainable_only: bool = True) -> None:
        """Copy the masters into the working copies (rounded to the working precision): the
        trainable ones after an optimizer step, every one with ``trainable_only=False``."""
        slots = self._trainable if trainable_only else self._slots
        if slots:
            torch._foreach_copy_(
                [slot.working for slot in slots], [slot.master.detach() for slot in slots]
            )
