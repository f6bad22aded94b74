"""The fused Triton expert kernels (``ExpertConfig.kernel = "triton"``), run under Triton's
interpreter on the CPU: outputs and every gradient against the PyTorch path (itself checked
against the per-token loop), dropless and with capacity, empty experts, padding, autocast, the
deterministic mode, and the logged fallback."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging

import pytest
import torch

pytest.importorskip("triton")

from moekit.dispatch.config import DispatchMode, DropPriority
from moekit.dispatch.dispatcher import DispatchConfig
from moekit.experts import ExpertConfig, triton_moe
from moekit.experts.activations import Activation
from moekit.experts.triton_moe import triton_available
from moekit.layers import MoEConfig

pytestmark = pytest.mark.skipif(
    not triton_available("cuda" if torch.cuda.is_available() else "cpu")[0],
    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layers(activation=Activation.SWIGLU, dispatch=None, kernel="triton", **expert_options):
    """The same MoE layer twice: PyTorch path and the fused ``kernel``, equal weights."""
    config = MoEConfig(
        num_experts=6,
        top_k=2,
        experts=ExpertConfig(hidden=20, activation=activation, **expert_options),
        dispatch=dispatch or DispatchConfig(),
    )
    torch.manual_seed(0)
    reference = config.build(d_model=24).to(DEVICE)
    fused_config = dataclasses.replace(
        config, experts=dataclasses.replace(config.experts, kernel=kernel)
    )
    fused = fused_config.build(d_model=24).to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def _compare(reference, fused, x, mask=None, rtol=1e-5, atol=1e-5):
    results = []
    for layer in (reference, fused):
        inp = x.detach().clone().requires_grad_()
        out = layer(inp, mask)
        y = out.output
        weights = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)
        (y.float() * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        results.append((y, inp.grad, grads))
    (y0, gx0, g0), (y1, gx1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=rtol, atol=atol)
    torch.testing.assert_close(gx1, gx0, rtol=rtol, atol=atol)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=rtol, atol=atol, msg=name)
    return results


@pytest.mark.parametrize(
    "activation",
    [Activation.SWIGLU, Activation.GEGLU_TANH, Activation.GELU, Activation.RELU2],
    ids=lambda a: a.value,
)
def test_fused_kernels_equal_the_pytorch_path_on_outputs_and_every_gradient(
    activation, monkeypatch
):
    calls = []
    real = triton_moe.triton_moe
    monkeypatch.setattr(triton_moe, "triton_moe", lambda *a: calls.append(1) or real(*a))
    reference, fused = _layers(activation)
    x = torch.randn(3, 7, 24, device=DEVICE)
    (y0, _, _), _ = _compare(reference, fused, x)
    assert calls == [1]  # the fused kernels ran (not a silent fallback), once per forward
    assert not torch.equal(y0, torch.zeros_like(y0))


FUSED_KERNELS = ["triton"]
if importlib.util.find_spec("liger_kernel") is not None:
    FUSED_KERNELS.append("liger")  # Liger-Kernel's fused MoE behind the same seam


@pytest.mark.parametrize("kernel", FUSED_KERNELS)
def test_with_capacity_drops_padding_and_an_empty_expert(kernel):
    dispatch = DispatchConfig(
        mode=DispatchMode.CAPACITY, capacity_factor=0.5, drop_priority=DropPriority.TOKEN
    )
    reference, fused = _layers(dispatch=dispatch, kernel=kernel)
    with torch.no_grad():  # expert 5 gets no token: its logits far below the rest
        fused.router.weight_ED[5] = reference.router.weight_ED[5] = 0.0
        fused.router.weight_ED[5, 0] = reference.router.weight_ED[5, 0] = -1e4
    x = torch.randn(2, 9, 24, device=DEVICE)
    x[..., 0] = 1.0
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    mask[1, :3] = False
    _, (y1, _, grads) = _compare(reference, fused, x, mask)
    assert torch.equal(grads["experts.w_in_EDH"][5], torch.zeros_like(grads["experts.w_in_EDH"][5]))
    assert torch.equal(y1[1, :3], torch.zeros_like(y1[1, :3]))  # padding: no expert output


def test_under_autocast_the_kernels_run_in_bf16_and_master_weights_get_fp32_gradients():
    reference, fused = _layers()
    x = torch.randn(2, 5, 24, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        (y0, _, _), (y1, _, grads) = _compare(reference, fused, x, rtol=3e-2, atol=3e-2)
    assert y1.dtype == y0.dtype
    assert grads["experts.w_in_EDH"].dtype == torch.float32


def test_deterministic_mode_is_bitwise_reproducible():
    _, fused = _layers()
    x = torch.randn(2, 6, 24, device=DEVICE)
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            inp = x.clone().requires_grad_()
            y = fused(inp).output
            y.sum().backward()
            runs.append((y.detach(), inp.grad))
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    torch.testing.assert_close(fused(x).output, runs[0][0], rtol=1e-5, atol=1e-6)


def test_what_the_kernels_do_not_cover_falls_back_with_a_logged_reason(caplog):
    reference, fused = _layers(bias=True)
    x = torch.randn(2, 4, 24, device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="moekit.experts.backends"):
        _compare(reference, fused, x)
    assert "expert biases have no fused kernel" in caplog.text


def test_a_language_model_trains_the_same_with_either_backend():
    from moekit.models import TransformerConfig
    from moekit.models.common.attention import AttentionConfig
    from moekit.models.common.placement import MoEPlacementConfig

    def lm(kernel: str):
        layer = MoEConfig(num_experts=4, top_k=2, experts=ExpertConfig(hidden=16, kernel=kernel))
        config = TransformerConfig(
            vocab_size=32, d_model=16, n_layers=2, ffn_hidden=32,
            attention=AttentionConfig(n_heads=2), moe=MoEPlacementConfig(layer=layer),
        )  # fmt: skip
        torch.manual_seed(0)
        return config.build()

    tokens = torch.randint(0, 32, (2, 8))
    losses = []
    for model in (lm("auto"), lm("triton")):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        run = []
        for _ in range(3):
            out = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                out.logits.flatten(0, 1), tokens[:, 1:].flatten()
            )
            (loss + out.aux_loss).backward()
            optimizer.step()
            optimizer.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
