"""Liger-Kernel's fused MoE as an expert backend (``ExpertConfig.kernel = "liger"``), run
under Triton's interpreter on the CPU: outputs and every gradient against the PyTorch path
(itself checked against the per-token loop), dropless, with padding, under autocast, and the
logged fallbacks; capacity drops with padding and an empty expert are checked for both fused
backends in ``test_triton_backend.py``."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("liger_kernel")

from moekit.experts import liger_moe
from moekit.experts.activations import Activation
from tests.experts.test_triton_backend import DEVICE, _compare, _layers, pytestmark  # noqa: F401


def test_liger_equals_the_pytorch_path_on_outputs_and_every_gradient(monkeypatch):
    calls = []
    real = liger_moe.liger_moe
    monkeypatch.setattr(liger_moe, "liger_moe", lambda *a: calls.append(1) or real(*a))
    import moekit.experts.backends as backends

    monkeypatch.setattr(backends, "liger_moe", liger_moe.liger_moe)
    reference, fused = _layers(kernel="liger")
    x = torch.randn(3, 7, 24, device=DEVICE)
    (y0, _, _), _ = _compare(reference, fused, x)
    assert calls == [1]  # Liger ran (not a silent fallback), once per forward
    assert not torch.equal(y0, torch.zeros_like(y0))


def test_liger_dropless_with_padding_keeps_the_padding_rows_at_zero():
    reference, fused = _layers(kernel="liger")
    x = torch.randn(2, 6, 24, device=DEVICE)
    mask = torch.ones(2, 6, dtype=torch.bool, device=DEVICE)
    mask[0, :2] = False
    _, (y1, _, _) = _compare(reference, fused, x, mask)
    assert torch.equal(y1[0, :2], torch.zeros_like(y1[0, :2]))


@pytest.mark.skipif(
    DEVICE == "cpu",
    reason="Triton's interpreter has no bf16 atomic add, which Liger's backward uses for the "
    "router-weight gradient (checked on a GPU)",
)
def test_liger_under_autocast_computes_in_bf16_with_fp32_master_gradients():
    reference, fused = _layers(kernel="liger")
    x = torch.randn(2, 5, 24, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        (y0, _, _), (y1, _, grads) = _compare(reference, fused, x, rtol=3e-2, atol=3e-2)
    assert y1.dtype == y0.dtype
    assert grads["experts.w_in_EDH"].dtype == torch.float32


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (dict(activation=Activation.GELU), "activation 'gelu' has no Liger kernel"),
        (dict(bias=True), "expert biases have no fused kernel"),
    ],
)
def test_what_liger_does_not_cover_falls_back_with_a_logged_reason(caplog, options, reason):
    reference, fused = _layers(kernel="liger", **options)
    x = torch.randn(2, 4, 24, device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="moekit.experts.backends"):
        _compare(reference, fused, x)
    assert reason in caplog.text and "experts.kernel='liger'" in caplog.text


def test_without_liger_installed_the_layer_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(liger_moe.importlib.util, "find_spec", lambda name: None)
    reference, fused = _layers(kernel="liger")
    x = torch.randn(2, 4, 24, device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="moekit.experts.backends"):
        _compare(reference, fused, x)
    assert "liger-kernel is not installed" in caplog.text
