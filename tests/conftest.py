"""Shared helpers: tiny MoE layers and gradient comparison."""

from __future__ import annotations

import pytest
import torch

import moekit


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_moe(
    d_model: int = 8,
    num_experts: int = 4,
    top_k: int = 2,
    hidden: int = 12,
    **kwargs,
) -> moekit.MoE:
    experts = kwargs.pop("experts", moekit.ExpertConfig(hidden=hidden))
    cfg = moekit.MoEConfig(
        d_model=d_model, num_experts=num_experts, top_k=top_k, experts=experts, **kwargs
    )
    return cfg.build()


def loss_and_grads(module: torch.nn.Module, x: torch.Tensor, forward) -> tuple[torch.Tensor, dict]:
    """Run ``forward(x)``, reduce it with fixed random coefficients, return output and grads."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = forward(x)
    coeff = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view(out.shape)
    (out * coeff).sum().backward()
    grads = {"x": x.grad.clone()}
    for name, p in module.named_parameters():
        grads[name] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
    return out.detach(), grads


def assert_grads_close(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(
            a[name], b[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.fixture
def tiny_text(tmp_path):
    """A small corpus of real text: a few standard-library modules copied to a folder."""
    from moekit.training.data import standard_library_files

    folder = tmp_path / "corpus"
    folder.mkdir()
    for path in standard_library_files()[:6]:
        (folder / path.name).write_text(path.read_text(encoding="utf-8", errors="replace"))
    return folder
