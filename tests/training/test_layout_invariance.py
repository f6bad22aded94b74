"""Micro-batching is part of the layout, and randomness part of the data (issue 29): a step's
global batch is one draw whatever its split into micro-batches, and the model's random draws
(jitter, noisy gating, GShard's second expert, SparseMixer's sampling) depend on the step and the
token's place in the global batch only. The 4-rank halves of these checks are in
``tests/distributed/test_resume_layouts.py`` and ``tests/distributed/test_torchrun.py``."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.routing.config import RouterConfig
from moekit.training import load_train_config, train
from moekit.training.checkpoint import restore_param_groups
from moekit.utils.randomness import (
    dropout_rows,
    normal_like,
    rows_named,
    token_randomness,
    uniform_like,
)
from tests.builders import TINY_MOE

GLOBAL_BALANCE = [
    "steps=5",
    "eval_every=5",
    "model.moe.layer.aux_loss.switch_scope=global_batch",
    "model.moe.layer.router.noisy_gating=true",
    "model.moe.layer.aux_loss.load=0.01",
    "model.moe.layer.aux_loss.load_scope=global_batch",
    "model.moe.layer.router.jitter_eps=0.01",
    "model.moe.layer.experts.dropout=0.1",
]


def _run(tmp_path, tiny_text, name: str, batch_size: int, accum: int):
    overrides = [
        *TINY_MOE,
        *GLOBAL_BALANCE,
        f"data.batch_size={batch_size}",
        f"optim.grad_accum={accum}",
        f"data.path={tiny_text}",
        f"out_dir={tmp_path / name}",
    ]
    return train(load_train_config(None, overrides), progress=False)


def test_a_global_batch_split_into_micro_batches_trains_the_same(tmp_path, tiny_text):
    """8×1, 4×2 and 2×4: the same losses at every step and the same parameters (fp32, 1e-5),
    with global-batch balancing, noisy gating and jitter on."""
    runs = {
        layout: _run(tmp_path, tiny_text, f"{layout[0]}x{layout[1]}", *layout)
        for layout in ((8, 1), (4, 2), (2, 4))
    }
    reference = runs[(8, 1)]
    for layout, result in runs.items():
        for ours, theirs in zip(result.records, reference.records, strict=True):
            assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5), (layout, ours["step"])
            assert ours["aux_loss"] == pytest.approx(theirs["aux_loss"], rel=1e-4, abs=1e-7)
        want = reference.model.state_dict()
        for name, value in result.model.state_dict().items():
            torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-5, msg=name)


def test_the_first_step_sees_the_same_windows_whatever_the_split(tmp_path, tiny_text):
    """Before the fix 8×1 and 4×2 already differed at step 1, before any update: the two
    layouts drew different windows."""
    one = _run(tmp_path, tiny_text, "a", 8, 1)
    two = _run(tmp_path, tiny_text, "b", 4, 2)
    assert one.records[0]["loss"] == pytest.approx(two.records[0]["loss"], rel=1e-6)


@pytest.mark.parametrize(
    "router",
    [
        RouterConfig(kind="top_k", noisy_gating=True, jitter_eps=0.1),
        RouterConfig(kind="gshard_top2"),
        RouterConfig(kind="sparsemixer", input_jitter_eps=0.1),
    ],
    ids=["noisy-jitter", "gshard", "sparsemixer"],
)
def test_a_routers_draws_depend_on_the_token_not_on_the_split(router):
    """Routing 8 rows at once equals routing them as 4 + 4 (ranks or micro-batches) under
    keyed randomness; outside it the router draws from torch's generator as before."""
    torch.manual_seed(0)
    moe = moekit.MoEConfig(
        num_experts=4, top_k=2, experts=moekit.ExpertConfig(hidden=8), router=router
    ).build(d_model=8)
    moe.train()
    x = torch.randn(8, 5, 8)

    def routed(rows: slice, offset: int):
        with token_randomness(moe, seed=3, step=7, row_offset=offset, rows=rows.stop - rows.start):
            return moe(x[rows]).routing

    whole = routed(slice(0, 8), 0)
    halves = [routed(slice(0, 4), 0), routed(slice(4, 8), 4)]
    assert torch.equal(whole.expert_idx_TK, torch.cat([h.expert_idx_TK for h in halves]))
    torch.testing.assert_close(whole.weights_TK, torch.cat([h.weights_TK for h in halves]))
    another_step = token_randomness(moe, seed=3, step=8, row_offset=0, rows=8)
    with another_step:
        other = moe(x).routing
    # a new step draws anew (GShard's draw decides which second experts are kept)
    drawn = [
        r.weights_TK if r.assignment_mask_TK is None else r.assignment_mask_TK
        for r in (other, whole)
    ]
    assert not torch.equal(*drawn)


def test_expert_dropout_depends_on_the_token_and_expert_not_on_the_split():
    """Expert dropout acts on rows sorted by expert; keyed, a token's mask in an expert is the
    same whether its row was computed with 8 rows or 4 + 4, and differs between layers."""
    torch.manual_seed(0)
    config = moekit.MoEConfig(
        num_experts=4, top_k=2, experts=moekit.ExpertConfig(hidden=16, dropout=0.5)
    )
    moe = config.build(d_model=8)
    moe.train()
    x = torch.randn(8, 5, 8)

    def output(rows: slice, offset: int):
        with token_randomness(moe, seed=3, step=7, row_offset=offset, rows=rows.stop - rows.start):
            return moe(x[rows]).output

    whole = output(slice(0, 8), 0)
    torch.testing.assert_close(whole, torch.cat([output(slice(0, 4), 0), output(slice(4, 8), 4)]))
    moe.eval()
    without = moe(x).output
    assert not torch.allclose(whole, without)  # the dropout did act
    moe.train()
    with token_randomness(moe, seed=3, step=8, row_offset=0, rows=8):
        assert not torch.allclose(moe(x).output, whole)  # a new step draws anew
    # the keyed mask keeps about 1 - p of the hidden units
    a = torch.ones(4096, 64)
    with (
        token_randomness(moe, seed=0, step=0, row_offset=0, rows=1),
        rows_named(torch.arange(4096)),
    ):
        kept = dropout_rows(a, 0.5, moe.experts, "dropout")
    assert abs(float((kept > 0).float().mean()) - 0.5) < 0.01
    assert torch.all((kept == 0) | (kept == 2.0))


def test_keyed_noise_has_the_right_distribution():
    layer = torch.nn.Linear(1, 1)
    x = torch.empty(4096, 64)
    with token_randomness(layer, seed=0, step=0, row_offset=0, rows=4):
        u, z = uniform_like(x, layer, "u"), normal_like(x, layer, "z")
        again = uniform_like(x, layer, "u")
        other_site = uniform_like(x, layer, "v")
    assert torch.equal(u, again) and not torch.equal(u, other_site)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1.0) < 0.01
    # neighbouring tokens and columns are uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([z[:-1, 0], z[1:, 0]]))[0, 1])) < 0.05
    assert abs(float(torch.corrcoef(torch.stack([z[:, 0], z[:, 1]]))[0, 1])) < 0.05


def test_keyed_noise_refuses_what_it_cannot_key():
    layer, stranger = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with token_randomness(layer, seed=0, step=0, row_offset=0, rows=3):
        with pytest.raises(ValueError, match="cannot be split into the micro-batch's 3 rows"):
            uniform_like(torch.empty(8, 2), layer, "u")
        with pytest.raises(ValueError, match="not part of the model given to token_randomness"):
            uniform_like(torch.empty(6, 2), stranger, "u")
    with (
        pytest.raises(ValueError, match="rows must be > 0"),
        token_randomness(layer, seed=0, step=0, row_offset=0, rows=0),
    ):
        pass


def test_a_resume_restores_the_optimizers_hyperparameters_and_refuses_other_groups():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    saved = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=0.5)
    saved.param_groups[0]["lr"] = 0.125
    fresh = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=0.5)
    restore_param_groups(fresh, saved.state_dict()["param_groups"])
    assert fresh.param_groups[0]["lr"] == 0.125 and fresh.param_groups[1]["lr"] == 0.5
    assert isinstance(fresh.param_groups[0]["betas"], tuple)
    one_group = torch.optim.AdamW(params, lr=0.5)
    with pytest.raises(ValueError, match="2 parameter groups, this run's 1"):
        restore_param_groups(one_group, saved.state_dict()["param_groups"])


def test_optimizer_moments_follow_their_parameters_by_name_on_resume():
    """A checkpoint's optimizer state names its parameters: resumed by a model that registers
    them in another order (a refactor of a block), each parameter gets its own moments; a
    state from before the names loads by position as before; other parameters are refused."""
    from moekit.training.checkpoint import align_optimizer_state, parameter_names
    from tests.builders import tiny_lm

    model = tiny_lm()
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in model.named_parameters() if p.dim() > 1]},
            {"params": [p for n, p in model.named_parameters() if p.dim() <= 1]},
        ]
    )
    model(torch.randint(0, 40, (2, 6))).logits.square().mean().backward()
    optimizer.step()
    saved = {**optimizer.state_dict(), "param_names": parameter_names(model, optimizer)}
    moments = {n: optimizer.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    # the same parameters, each group in reverse order (as a reordered model would give)
    other = torch.optim.AdamW(
        [
            {"params": [p for n, p in model.named_parameters() if p.dim() > 1][::-1]},
            {"params": [p for n, p in model.named_parameters() if p.dim() <= 1][::-1]},
        ]
    )
    other.load_state_dict(align_optimizer_state(saved, parameter_names(model, other)))
    for name, param in model.named_parameters():
        assert torch.equal(other.state[param]["exp_avg"], moments[name]), name
    legacy = {k: v for k, v in saved.items() if k != "param_names"}
    assert align_optimizer_state(legacy, parameter_names(model, other)) is legacy
    fewer = [group[1:] for group in parameter_names(model, other)]
    with pytest.raises(ValueError, match="other parameters than this model's"):
        align_optimizer_state(saved, fewer)
