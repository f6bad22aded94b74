"""Tiny configurations and comparison helpers shared by the tests (one place for each)."""

from __future__ import annotations

import torch

import moekit
from moekit.dispatch.reference import reference_moe_output
from moekit.models import MoEPlacementConfig
from moekit.models.common.attention import AttentionConfig
from moekit.models.common.layout import TokenMixerLayout
from moekit.models.mixers import GatedDeltaNetConfig, Mamba2Config, ShortConvConfig

# Router families other than plain top-k: (RouterConfig options, top_k) for tiny layers.
KINDS = {
    "dense": (dict(kind="dense"), 1),
    "dense_eigen2013": (dict(kind="dense", gate_hidden=6), 1),
    "gshard_top2": (dict(kind="gshard_top2"), 2),
    "expert_choice": (dict(kind="expert_choice", capacity_factor=1.5), 1),
    "hash": (dict(kind="hash"), 1),
    "random_static": (dict(kind="random_static", vocab_size=50), 1),
    "base": (dict(kind="base"), 1),
    "top_p": (dict(kind="top_p", top_p=0.6), 3),
}


def hybrid_mixers() -> TokenMixerLayout:
    """A four-block layer pattern of every recurrent token mixer and softmax attention (width
    16: Gated DeltaNet, Mamba2, a short convolution, attention)."""
    return TokenMixerLayout(
        pattern=["linear", "ssm", "conv", "attention"],
        mixers={
            "linear": GatedDeltaNetConfig(
                n_key_heads=2, n_value_heads=2, key_head_dim=8, value_head_dim=8, chunk=4
            ),
            "ssm": Mamba2Config(n_heads=4, head_dim=8, state_dim=8, chunk=4),
            "conv": ShortConvConfig(),
        },
    )


# Training overrides for a run of a few seconds on the embedded corpus.
TINY = [
    "steps=12",
    "eval_every=6",
    "eval_batches=2",
    "log_every=1",
    "data.seq_len=32",
    "data.batch_size=4",
    "model.d_model=32",
    "model.n_layers=2",
    "model.ffn_hidden=64",
    "model.max_seq_len=64",
    "optim.warmup_steps=2",
]
TINY_MOE = [
    *TINY,
    "model.moe.layer.num_experts=4",
    "model.moe.layer.experts.hidden=32",
    "model.moe.layer.top_k=2",
]


def make_moe(
    d_model: int = 8,
    num_experts: int = 4,
    top_k: int = 2,
    hidden: int = 12,
    **kwargs,
) -> moekit.MoE:
    experts = kwargs.pop("experts", moekit.ExpertConfig(hidden=hidden))
    cfg = moekit.MoEConfig(num_experts=num_experts, top_k=top_k, experts=experts, **kwargs)
    return cfg.build(d_model=d_model)


def placement(
    d_model: int,
    num_experts: int = 4,
    top_k: int = 2,
    expert_hidden: int = 16,
    *,
    every: int = 1,
    first_dense: int = 0,
    expert_bias: bool = False,
    activation: str = "swiglu",
    **layer,
) -> MoEPlacementConfig:
    """A tiny model's MoE placement: one ``MoEConfig`` (``layer``: its other options) in every
    ``every``-th block after ``first_dense`` dense ones (``d_model``, the model's width, is
    the model config's: kept for the callers' readability)."""
    experts = moekit.ExpertConfig(hidden=expert_hidden, activation=activation, bias=expert_bias)
    config = moekit.MoEConfig(num_experts=num_experts, top_k=top_k, experts=experts, **layer)
    return MoEPlacementConfig(layer=config, every=every, first_dense=first_dense)


def tiny_lm(
    *,
    vocab_size: int = 40,
    d_model: int = 16,
    n_layers: int = 2,
    ffn_hidden: int = 24,
    seed: int = 0,
    **moe,
):
    """A tiny ``TransformerLM`` (2 heads) with an MoE of 4 experts of width 8, top-2 (``moe``:
    other ``placement`` options, e.g. ``every=2``, ``router=...``)."""
    from moekit.models import TransformerConfig, TransformerLM

    moe = {"num_experts": 4, "top_k": 2, "expert_hidden": 8, **moe}
    torch.manual_seed(seed)
    config = TransformerConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        attention=AttentionConfig(n_heads=2),
        ffn_hidden=ffn_hidden,
        moe=placement(d_model, **moe),
    )
    return TransformerLM(config)


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


def assert_layer_matches_reference(moe, x, padding_mask=None):
    """The layer's fast path equals the looped reference on outputs and every gradient."""

    def fast(x_):
        return moe(x_, padding_mask).output

    def reference(x_):
        routing = moe.router(x_.reshape(-1, moe.d_model))
        return reference_moe_output(moe, x_, routing, padding_mask)

    out_fast, g_fast = loss_and_grads(moe, x, fast)
    out_ref, g_ref = loss_and_grads(moe, x, reference)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_fast, g_ref)
