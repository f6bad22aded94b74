"""The recurrent mixers' kernel seam (``moekit.models.mixers.kernels``): ``kernel="library"``
calls flash-linear-attention, mamba-ssm and causal-conv1d where they apply and falls back to
the PyTorch form (logging why) where they do not.

On the CPU the libraries cannot run, so the call sites are checked against stand-ins written
from each library's documented contract (a loop over time, independent of the chunked PyTorch
form); the real kernels are compared with the PyTorch form where a GPU and the library are
there."""

import importlib.util
import logging
import types

import pytest
import torch
import torch.nn.functional as F

from moekit.models.mixers import GatedDeltaNetConfig, Mamba2Config, ShortConvConfig, kernels
from moekit.models.mixers.recurrence import recurrence_loop

D = 16
CONFIGS = {
    "gated_deltanet": GatedDeltaNetConfig(
        n_key_heads=2, n_value_heads=4, key_head_dim=8, value_head_dim=8, chunk=4
    ),
    "mamba2": Mamba2Config(n_heads=4, head_dim=8, state_dim=8, n_groups=2, chunk=4),
    "short_conv": ShortConvConfig(),
}


def _pair(name, **options):
    """The mixer with ``kernel="torch"`` and ``kernel="library"``, equal weights."""
    import dataclasses

    torch.manual_seed(0)
    config = dataclasses.replace(CONFIGS[name], **options)
    reference = config.build(d_model=D, norm_eps=1e-6).double()
    library = dataclasses.replace(config, kernel="library").build(d_model=D, norm_eps=1e-6)
    library = library.double()
    library.load_state_dict(reference.state_dict())
    return reference, library


def _fla_contract(q, k, v, g, beta, *, scale, initial_state, output_final_state):
    """flash-linear-attention's ``chunk_gated_delta_rule`` as its docs define it: inputs
    ``(B, T, H, K)``, log decays ``g``, state ``(B, H, K, V)``."""
    assert output_final_state and q.shape[:3] == g.shape and k.shape == q.shape
    return recurrence_loop(q * scale, k, v, g, beta, initial_state_BHKV=initial_state)


def _mamba_contract(
    x, dt, A, B, C, *, chunk_size, initial_states, dt_softplus, return_final_states
):
    """mamba-ssm's ``mamba_chunk_scan_combined``: ``x (b, l, h, p)``, ``dt (b, l, h)``,
    ``A (h,)``, ``B``/``C (b, l, g, n)``; state ``(b, h, p, n)``."""
    assert not dt_softplus and return_final_states and chunk_size >= 1
    b, length, h, p = x.shape
    groups = B.shape[2]
    B = B.repeat_interleave(h // groups, dim=2)
    C = C.repeat_interleave(h // groups, dim=2)
    state = x.new_zeros(b, h, p, B.shape[-1]) if initial_states is None else initial_states
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + (dt[:, t, :, None, None] * x[:, t, :, :, None]) * B[:, t, :, None]
        ys.append((state * C[:, t, :, None]).sum(-1))
    return torch.stack(ys, dim=1), state


def _conv_contract(x_BCS, weight_CW, bias_C, activation=None):
    """causal-conv1d's ``causal_conv1d_fn``: ``(B, C, L)`` in and out, depthwise, causal."""
    assert activation is None
    width = weight_CW.shape[1]
    y = F.conv1d(
        F.pad(x_BCS, (width - 1, 0)), weight_CW.unsqueeze(1), bias_C, groups=x_BCS.shape[1]
    )
    return y


def _with_stand_ins(monkeypatch):
    """Route the seam to the stand-ins, recording which of them ran."""
    ran = []
    fakes = {
        "gated_delta_rule": ("chunk_gated_delta_rule", _fla_contract),
        "mamba_scan": ("mamba_chunk_scan_combined", _mamba_contract),
        "causal_conv": ("causal_conv1d_fn", _conv_contract),
    }

    def library(what, x, kernel, segments):
        if kernels.MixerKernel(kernel) is not kernels.MixerKernel.LIBRARY or segments is not None:
            return None
        name, function = fakes[what]

        def recorded(*args, **kwargs):
            ran.append(what)
            return function(*args, **kwargs)

        return types.SimpleNamespace(**{name: recorded})

    monkeypatch.setattr(kernels, "_library", library)
    return ran


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("padded", [False, True])
def test_the_library_call_sites_keep_each_librarys_contract(monkeypatch, name, padded):
    ran = _with_stand_ins(monkeypatch)
    reference, library = _pair(name)
    x = torch.randn(2, 9, D, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    if padded:
        mask[0, :3] = False  # left padding
    options = dict(mask_BS=mask) if padded else {}
    expected = reference(x, **options)
    got = library(x, **options)
    keep = mask.unsqueeze(-1)
    torch.testing.assert_close(got * keep, expected * keep, rtol=1e-9, atol=1e-10)
    grads = torch.autograd.grad((expected * keep).square().sum(), [x, *reference.parameters()])
    grads_lib = torch.autograd.grad((got * keep).square().sum(), [x, *library.parameters()])
    for a, b in zip(grads, grads_lib, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)
    expected_kernels = {
        "gated_deltanet": {"gated_delta_rule", "causal_conv"},
        "mamba2": {"mamba_scan", "causal_conv"},
        "short_conv": {"causal_conv"},
    }[name]
    assert set(ran) == expected_kernels  # the stand-ins, not the PyTorch form, computed it


@pytest.mark.parametrize("name", ["gated_deltanet", "mamba2"])
def test_a_prefill_with_a_cache_leaves_the_state_the_pytorch_form_leaves(monkeypatch, name):
    """The library's state layout and initial state: a cached prefill from a non-empty state,
    then decoding steps, equal the PyTorch form's outputs and states."""
    ran = _with_stand_ins(monkeypatch)
    reference, library = _pair(name)
    conv_shape, state_shape = reference.config.state_shapes(2, D)
    torch.manual_seed(1)
    start = (torch.randn(conv_shape).double(), torch.randn(state_shape).double())
    caches = [tuple(t.clone() for t in start) for _ in range(2)]
    x = torch.randn(2, 7, D, dtype=torch.float64)
    for t0, t1 in ((0, 5), (5, 6), (6, 7)):
        expected = reference(x[:, t0:t1], cache=caches[0])
        got = library(x[:, t0:t1], cache=caches[1])
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
        for a, b in zip(caches[0], caches[1], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
    assert {"gated_delta_rule", "mamba_scan"} & set(ran)


def test_decoding_and_packed_sequences_take_the_pytorch_form(monkeypatch):
    ran = _with_stand_ins(monkeypatch)
    reference, library = _pair("gated_deltanet")
    x = torch.randn(1, 6, D, dtype=torch.float64)
    segments = torch.tensor([[1, 1, 1, 2, 2, 2]])
    torch.testing.assert_close(
        library(x, segment_ids_BS=segments), reference(x, segment_ids_BS=segments)
    )
    assert ran == []


def test_a_library_that_cannot_run_falls_back_with_its_reason(caplog):
    kernels._reported.clear()
    reference, library = _pair("mamba2")
    x = torch.randn(2, 7, D, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="moekit.models.mixers.kernels"):
        out = library(x)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    text = caplog.text
    assert "runs the PyTorch form" in text
    assert "not installed" in text or "on cpu" in text or "float64" in text


def test_a_bad_kernel_name_is_refused_by_name():
    with pytest.raises(ValueError, match=r"gated_deltanet\.kernel"):
        GatedDeltaNetConfig(kernel="fast")


LIBRARIES = {"gated_deltanet": "fla", "mamba2": "mamba_ssm", "short_conv": "causal_conv1d"}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_real_library_kernels_match_the_pytorch_form_on_a_gpu(name):
    if not torch.cuda.is_available() or importlib.util.find_spec(LIBRARIES[name]) is None:
        pytest.skip(f"needs a CUDA device and {LIBRARIES[name]}")
    reference, library = _pair(name, chunk=64) if name != "short_conv" else _pair(name)
    reference, library = reference.float().cuda(), library.float().cuda()
    x = torch.randn(2, 128, D, device="cuda", requires_grad=True)
    expected, got = reference(x), library(x)
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
    g_ref = torch.autograd.grad(expected.square().sum(), [x, *reference.parameters()])
    g_lib = torch.autograd.grad(got.square().sum(), [x, *library.parameters()])
    for a, b in zip(g_ref, g_lib, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-2)
