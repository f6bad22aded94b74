"""The recurrent token mixers (issue 31): each chunked parallel form against its loop over
positions (outputs and every gradient, float64 ``gradcheck``), decoding with a state cache
against the full forward, and padding and packed sequences that change no other sequence."""

from __future__ import annotations

import pytest
import torch

from moekit.models.mixers import GatedDeltaNetConfig, Mamba2Config, MambaConfig, ShortConvConfig
from moekit.models.mixers.conv import causal_conv, causal_conv_loop
from moekit.models.mixers.recurrence import recurrence_chunked, recurrence_loop
from moekit.models.mixers.selective_scan import selective_scan_chunked, selective_scan_loop

B, S, H, K, V = 2, 11, 2, 3, 4


def _inputs(delta: bool, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, K, generator=g, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(B, S, H, K, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, S, H, V, generator=g, dtype=dtype)
    log_decay = -torch.rand(B, S, H, generator=g, dtype=dtype)
    beta = torch.rand(B, S, H, generator=g, dtype=dtype) if delta else None
    state = torch.randn(B, H, K, V, generator=g, dtype=dtype)
    return q, k, v, log_decay, beta, state


SEGMENTS = torch.tensor([[1] * 4 + [2] * 5 + [3] * 2, [7] * 11])
MASK = torch.ones(B, S, dtype=torch.bool)
MASK[1, :3] = False  # left padding in the second row


@pytest.mark.parametrize("delta", [False, True], ids=["gated", "delta-rule"])
@pytest.mark.parametrize("packed", [False, True], ids=["one-sequence", "packed"])
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_chunked_recurrence_equals_the_loop_with_every_gradient(delta, packed, chunk):
    inputs = [t.requires_grad_() if t is not None else None for t in _inputs(delta)]
    q, k, v, log_decay, beta, state = inputs
    options = dict(
        initial_state_BHKV=state, mask_BS=MASK, segment_ids_BS=SEGMENTS if packed else None
    )
    want_o, want_s = recurrence_loop(q, k, v, log_decay, beta, **options)
    got_o, got_s = recurrence_chunked(q, k, v, log_decay, beta, chunk=chunk, **options)
    torch.testing.assert_close(got_o, want_o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_s, want_s, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(want_o), torch.randn_like(want_s)
    tensors = [t for t in inputs if t is not None]
    want_grads = torch.autograd.grad(
        (want_o * weights[0]).sum() + (want_s * weights[1]).sum(), tensors
    )
    got_grads = torch.autograd.grad(
        (got_o * weights[0]).sum() + (got_s * weights[1]).sum(), tensors
    )
    for want, got in zip(want_grads, got_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("delta", [False, True], ids=["gated", "delta-rule"])
def test_chunked_recurrence_gradcheck(delta):
    q, k, v, log_decay, beta, state = _inputs(delta)
    tensors = [q[:1, :5], k[:1, :5], v[:1, :5], log_decay[:1, :5], state[:1]]
    if beta is not None:
        tensors.append(beta[:1, :5])
    tensors = [t.detach().clone().requires_grad_() for t in tensors]

    def run(q, k, v, log_decay, state, *beta):
        out, final = recurrence_chunked(
            q, k, v, log_decay, beta[0] if beta else None, initial_state_BHKV=state, chunk=2
        )
        return out, final

    assert torch.autograd.gradcheck(run, tensors)


def test_a_packed_sequence_equals_its_sequences_run_apart():
    q, k, v, log_decay, beta, _ = _inputs(True)
    packed, _ = recurrence_chunked(q, k, v, log_decay, beta, segment_ids_BS=SEGMENTS, chunk=4)
    for lo, hi in ((0, 4), (4, 9), (9, 11)):
        alone, _ = recurrence_loop(
            q[:1, lo:hi], k[:1, lo:hi], v[:1, lo:hi], log_decay[:1, lo:hi], beta[:1, lo:hi]
        )
        torch.testing.assert_close(packed[:1, lo:hi], alone)


def _scan_inputs(dtype=torch.float64, seed: int = 0, D: int = 3, N: int = 4):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, S, D, generator=g, dtype=dtype)
    dt = torch.rand(B, S, D, generator=g, dtype=dtype) * 2  # large steps: strong decay
    A = -torch.rand(D, N, generator=g, dtype=dtype) * 4
    b = torch.randn(B, S, N, generator=g, dtype=dtype)
    c = torch.randn(B, S, N, generator=g, dtype=dtype)
    state = torch.randn(B, D, N, generator=g, dtype=dtype)
    return u, dt, A, b, c, state


@pytest.mark.parametrize("packed", [False, True], ids=["one-sequence", "packed"])
@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
def test_chunked_selective_scan_equals_the_loop_with_every_gradient(packed, chunk):
    inputs = [t.requires_grad_() for t in _scan_inputs()]
    u, dt, A, b, c, state = inputs
    options = dict(
        initial_state_BDN=state, mask_BS=MASK, segment_ids_BS=SEGMENTS if packed else None
    )
    want_y, want_s = selective_scan_loop(u, dt, A, b, c, **options)
    got_y, got_s = selective_scan_chunked(u, dt, A, b, c, chunk=chunk, **options)
    torch.testing.assert_close(got_y, want_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_s, want_s, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(want_y), torch.randn_like(want_s)
    grads = [
        torch.autograd.grad((y * weights[0]).sum() + (s * weights[1]).sum(), inputs)
        for y, s in ((want_y, want_s), (got_y, got_s))
    ]
    for want, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_selective_scan_loop_is_the_recurrence_written_out():
    """The reference itself against the definition for one channel and state element."""
    u, dt, A, b, c, _ = _scan_inputs()
    y, final = selective_scan_loop(u, dt, A, b, c)
    h = torch.zeros(B, 3, 4, dtype=u.dtype)
    for t in range(S):
        for d in range(3):
            for n in range(4):
                decay = torch.exp(dt[:, t, d] * A[d, n])
                h[:, d, n] = decay * h[:, d, n] + dt[:, t, d] * u[:, t, d] * b[:, t, n]
        torch.testing.assert_close(y[:, t], (h * c[:, t, None, :]).sum(-1))
    torch.testing.assert_close(final, h)


def test_chunked_selective_scan_gradcheck():
    tensors = [t[:1, :5].detach().clone().requires_grad_() for t in _scan_inputs()[:2]]
    u, dt = tensors
    _, _, A, b, c, state = (t.detach().clone().requires_grad_() for t in _scan_inputs())
    b, c, state = b[:1, :5], c[:1, :5], state[:1]
    assert torch.autograd.gradcheck(
        lambda u, dt, A, b, c, s: selective_scan_chunked(
            u, dt, A, b, c, initial_state_BDN=s, chunk=2
        ),
        (u, dt, A, b.detach().requires_grad_(), c.detach().requires_grad_(), state.detach()),
    )


def test_causal_conv_equals_its_loop_and_decodes():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, S, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    state = torch.randn(B, 5, 3, generator=g, dtype=torch.float64)
    for segments in (None, SEGMENTS):
        kwargs = dict(state_BCW=state, mask_BS=MASK, segment_ids_BS=segments)
        got, got_state = causal_conv(x, w, bias, **kwargs)
        want, want_state = causal_conv_loop(x, w, bias, **kwargs)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_state, want_state)
        grads = [torch.autograd.grad(y.sum(), (x, w, bias)) for y in (got, want)]
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b)
    whole, _ = causal_conv(x, w, bias)
    first, carried = causal_conv(x[:, :6], w, bias)
    rest, _ = causal_conv(x[:, 6:], w, bias, state_BCW=carried)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), whole)
    assert torch.autograd.gradcheck(
        lambda x, w, b: causal_conv(x, w, b, segment_ids_BS=SEGMENTS[:, :6])[0],
        (x[:, :6].detach().requires_grad_(), w, bias),
    )


MIXERS = {
    "gated_deltanet": GatedDeltaNetConfig(
        n_key_heads=2, n_value_heads=4, key_head_dim=8, value_head_dim=6, chunk=4
    ),
    "mamba2": Mamba2Config(n_heads=4, head_dim=6, state_dim=5, n_groups=2, chunk=4, dt_max=0.5),
    "short_conv": ShortConvConfig(conv_width=3, bias=True),
    "mamba": MambaConfig(expand=2, state_dim=5, dt_rank=3, chunk=4, bias=True),
}
D = 16


def _mixer(name: str):
    torch.manual_seed(0)
    return MIXERS[name].build(d_model=D, norm_eps=1e-6).double()


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_each_mixer_chunked_equals_its_loop_on_outputs_and_parameter_gradients(name):
    mixer = _mixer(name)
    x = torch.randn(B, S, D, dtype=torch.float64, requires_grad=True)
    results = []
    for use_loop in (False, True):
        mixer.use_loop = use_loop
        y = mixer(x, mask_BS=MASK)
        grads = torch.autograd.grad((y * torch.cos(y)).sum(), [x, *mixer.parameters()])
        results.append((y, grads))
    (y_fast, g_fast), (y_loop, g_loop) = results
    torch.testing.assert_close(y_fast, y_loop, rtol=1e-10, atol=1e-10)
    for fast, loop in zip(g_fast, g_loop, strict=True):
        torch.testing.assert_close(fast, loop, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_each_mixer_gradchecks_in_float64(name):
    mixer = _mixer(name)
    x = torch.randn(1, 6, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mixer(x), (x,))


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_each_mixer_decodes_with_its_state_as_the_full_forward(name):
    mixer = _mixer(name)
    x = torch.randn(B, S, D, dtype=torch.float64)
    full = mixer(x)
    conv_shape, state_shape = MIXERS[name].state_shapes(B, D)
    cache = (torch.zeros(conv_shape, dtype=x.dtype), torch.zeros(state_shape, dtype=x.dtype))
    pieces = [mixer(x[:, :5], cache=cache)]
    pieces += [mixer(x[:, t : t + 1], cache=cache) for t in range(5, S)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_padding_and_packing_change_no_other_sequence(name):
    mixer = _mixer(name)
    x = torch.randn(1, 7, D, dtype=torch.float64)
    alone = mixer(x)
    padded = torch.cat([torch.randn(1, 3, D, dtype=x.dtype), x], dim=1)  # left padding
    mask = torch.tensor([[False] * 3 + [True] * 7])
    torch.testing.assert_close(mixer(padded, mask_BS=mask)[:, 3:], alone)
    other = torch.randn(1, 4, D, dtype=x.dtype)
    packed = torch.cat([other, x], dim=1)
    segments = torch.tensor([[1] * 4 + [2] * 7])
    out = mixer(packed, segment_ids_BS=segments)
    torch.testing.assert_close(out[:, 4:], alone)
    torch.testing.assert_close(out[:, :4], mixer(other))


def test_configs_refuse_bad_sizes_by_name():
    with pytest.raises(ValueError, match="n_value_heads=3 must be a multiple of n_key_heads=2"):
        GatedDeltaNetConfig(n_key_heads=2, n_value_heads=3)
    with pytest.raises(ValueError, match=r"mamba2\.n_groups=3 must divide n_heads=4"):
        Mamba2Config(n_heads=4, n_groups=3)
    with pytest.raises(ValueError, match=r"short_conv\.conv_width must be >= 2"):
        ShortConvConfig(conv_width=1)
    with pytest.raises(ValueError, match=r"mamba\.dt_rank must be >= 0"):
        MambaConfig(dt_rank=-1)
