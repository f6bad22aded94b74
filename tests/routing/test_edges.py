"""Edges where routing used to go quietly wrong: padding, underflow, empty batches, bad ids."""

import pytest
import torch

import moekit
from moekit.routing.reference import reference_route
from tests.builders import KINDS, make_moe

D, E = 8, 4
ALL_KINDS = {**KINDS, "top_k": (dict(kind="top_k"), 2), "soft": (dict(kind="soft"), 1)}


def _layer(name: str) -> moekit.MoE:
    options, top_k = ALL_KINDS[name]
    return make_moe(
        d_model=D,
        num_experts=E,
        top_k=top_k,
        router=moekit.RouterConfig(**options),
        aux_loss=moekit.AuxLossConfig(switch=0.01, z_loss=0.01),
    )


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", sorted(ALL_KINDS))
def test_padding_never_changes_real_tokens(name, training):
    """Two batches that differ only in their padding give the same real outputs."""
    moe = _layer(name).train(training)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, :4] = False  # left padding
    mask[1, 7:] = False  # right padding
    x = torch.randn(3, 10, D)
    other = torch.where(mask.unsqueeze(-1), x, 50 * torch.randn(3, 10, D))
    ids = torch.randint(0, 50, (3, 10))
    other_ids = torch.where(mask, ids, torch.randint(0, 50, (3, 10)))
    outs = []
    for inp, tok in ((x, ids), (other, other_ids)):
        torch.manual_seed(3)
        outs.append(moe(inp, padding_mask=mask, token_ids=tok).output)
    torch.testing.assert_close(outs[0][mask], outs[1][mask], rtol=1e-5, atol=1e-6)
    assert (outs[0][~mask] == 0).all()


@pytest.mark.parametrize("name", ["expert_choice", "base"])
def test_batch_routers_ignore_padding_for_slots(name):
    """Expert choice and BASE assign slots among real tokens only: a padded batch routes its
    real tokens exactly as the batch of real tokens alone does."""
    moe = _layer(name).train()
    x = torch.randn(1, 12, D)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 3:10] = True
    padded = moe(x, padding_mask=mask).output[mask]
    alone = moe(x[mask].unsqueeze(0)).output[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)


def test_soft_moe_fully_padded_sequence_is_finite():
    moe = _layer("soft")
    x = torch.randn(2, 5, D, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    out = moe(x, padding_mask=mask)
    assert torch.isfinite(out.output).all()
    assert (out.output[1] == 0).all()
    out.output.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in moe.parameters() if p.grad is not None)


def test_sigmoid_topk_does_not_underflow_against_a_float64_reference():
    """Large negative logits underflow every sigmoid to 0 in float32; the router must still
    give the float64 answer (not 0/0)."""
    router = moekit.RouterConfig(gating="sigmoid_topk").build(d_model=D, num_experts=2, top_k=1)
    with torch.no_grad():
        router.weight_ED.copy_(torch.tensor([[-30.0] * D, [-35.0] * D]))
    x = torch.full((5, D), 1.0) + 0.1 * torch.randn(5, D)  # logits about -240 and -280
    x.requires_grad_(True)
    fast = router(x)
    ref = reference_route(router.double(), x.detach().double())
    router.float()
    assert torch.equal(fast.expert_idx_TK, ref.expert_idx_TK)
    torch.testing.assert_close(fast.weights_TK, ref.weights_TK.float())
    torch.testing.assert_close(fast.probs_TE, ref.probs_TE.float())
    loss = moekit.losses.switch_load_balancing_loss(fast.probs_TE, fast.expert_idx_TK)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ["top_k", "expert_choice", "dense", "top_p", "base", "soft"])
def test_empty_batch_gives_zero_losses_and_finite_stats(name):
    moe = _layer(name)
    x = torch.randn(0, 6, D, requires_grad=True)
    out = moe(x)
    assert out.output.shape == (0, 6, D)
    assert torch.isfinite(out.aux_loss) and float(out.aux_loss.detach()) == 0.0
    stats = out.stats.as_dict()
    assert all(v is None or v == v for v in stats.values() if not isinstance(v, list))
    (out.output.sum() + out.aux_loss).backward()


def test_random_static_refuses_negative_token_ids():
    moe = _layer("random_static")
    with pytest.raises(ValueError, match=r"token_ids must be in \[0, vocab_size=50\)"):
        moe(torch.randn(3, D), token_ids=torch.tensor([1, -1, 2]))
    hashed = _layer("hash")
    with pytest.raises(ValueError, match="token_ids must be >= 0"):
        hashed(torch.randn(3, D), token_ids=torch.tensor([1, -1, 2]))
