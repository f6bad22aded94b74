"""Global-batch balancing: K micro-batches of B tokens give the loss value, the gradients and
the bias update of one batch of K·B tokens, for every balance scope (fp32)."""

import contextlib
import copy

import pytest
import torch

import moekit
from moekit.layers import global_batch_balance
from tests.builders import tiny_lm


def _model(aux: moekit.AuxLossConfig):
    return tiny_lm(
        d_model=16,
        num_experts=4,
        top_k=2,
        expert_hidden=8,
        router=moekit.RouterConfig(bias_balancing=True),
        aux_loss=aux,
    ).train()


def _step(model, batches, global_scope: bool):
    """Cross-entropy plus auxiliary losses over ``batches`` as gradient accumulation does;
    returns (mean loss, mean aux loss) and leaves the gradients."""
    model.zero_grad(set_to_none=True)
    K = len(batches)

    def forward(batch):
        out = model(batch[:, :-1])
        ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
        return ce, out.aux_loss

    def pre_pass():
        for batch in batches:
            forward(batch)

    totals = torch.zeros(2)
    context = (
        global_batch_balance(model, pre_pass, scale=K) if global_scope else contextlib.nullcontext()
    )
    with context:
        for batch in batches:
            ce, aux = forward(batch)
            ((ce + aux) / K).backward()
            totals += torch.stack([ce.detach(), aux.detach()]) / K
    moekit.update_expert_bias(model)
    return totals


SCOPES = {
    "switch": dict(switch=0.1, switch_scope="global_batch"),
    "importance": dict(switch=0.0, importance=0.2, importance_scope="global_batch"),
    "switch+importance+sequence": dict(
        switch=0.1,
        switch_scope="global_batch",
        importance=0.2,
        importance_scope="global_batch",
        switch_sequence=0.05,
        z_loss=0.01,
    ),
}


@pytest.mark.parametrize("scope", sorted(SCOPES))
def test_k_micro_batches_equal_one_batch_of_all_tokens(scope):
    aux = moekit.AuxLossConfig(**SCOPES[scope])
    tokens = torch.randint(0, 40, (6, 9), generator=torch.Generator().manual_seed(0))
    one = _model(aux)
    split = copy.deepcopy(one)
    expected = _step(one, [tokens], global_scope=True)
    got = _step(split, list(tokens.split(2)), global_scope=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(one.named_parameters(), split.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), (_, b) in zip(one.named_buffers(), split.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)  # the bias update
    # the micro-batch scope differs: balancing each micro-batch alone is another objective
    local = copy.deepcopy(split)
    for layer in moekit.layers.moe_layers(local):
        layer.aux_loss = moekit.AuxLossConfig(
            **{k: v for k, v in SCOPES[scope].items() if not k.endswith("_scope")}
        )
    if aux.switch or aux.importance:
        other = _step(local, list(tokens.split(2)), global_scope=False)
        assert not torch.allclose(other[1], expected[1], rtol=1e-4, atol=1e-6)


def test_the_pre_pass_counts_the_bias_tally_once():
    aux = moekit.AuxLossConfig(switch=0.1, switch_scope="global_batch")
    model = _model(aux)
    tokens = torch.randint(0, 40, (4, 9))
    with global_batch_balance(model, lambda: model(tokens[:, :-1]), scale=1):
        model(tokens[:, :-1])
    for layer in moekit.layers.moe_layers(model):
        assert layer.router.load_since_update_E.sum() == 4 * 8 * 2  # one forward's routes


def test_sequence_scope_is_refused_for_the_shazeer_losses():
    with pytest.raises(
        ValueError, match="importance_scope must be 'micro_batch' or 'global_batch'"
    ):
        moekit.AuxLossConfig(importance=0.1, importance_scope="sequence")


def test_train_runs_a_global_batch_step_with_gradient_accumulation(tmp_path, tiny_text):
    from moekit.training import load_train_config, train
    from tests.builders import TINY_MOE

    overrides = [
        *TINY_MOE,
        "steps=2",
        "optim.grad_accum=2",
        "model.moe.layer.aux_loss.switch_scope=global_batch",
        "model.moe.layer.aux_loss.importance=0.1",
        "model.moe.layer.aux_loss.importance_scope=global_batch",
        f"out_dir={tmp_path / 'run'}",
        f"data.path={tiny_text}",
    ]
    result = train(load_train_config(None, overrides), progress=False)
    assert all(r["aux_loss"] > 0 and r["loss"] == r["loss"] for r in result.records)


def test_load_scope_with_noisy_gating(monkeypatch):
    """Shazeer's load loss over the step: the noise is made a function of each token's logits
    (so K micro-batches and one batch draw the same noise), then K·B ≡ one batch as above."""
    # rounded first: the same logits computed in a smaller batch may differ in the last bit
    monkeypatch.setattr(torch, "randn_like", lambda t: torch.cos(torch.round(t.detach() * 64)))
    aux = moekit.AuxLossConfig(switch=0.0, load=0.2, load_scope="global_batch")
    tokens = torch.randint(0, 40, (6, 9), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    one = tiny_lm(
        d_model=16,
        num_experts=4,
        top_k=2,
        expert_hidden=8,
        router=moekit.RouterConfig(noisy_gating=True),
        aux_loss=aux,
    ).train()
    with torch.no_grad():  # the noise weights start at zero: give them a value
        for layer in moekit.layers.moe_layers(one):
            layer.router.noise_weight_ED.normal_(std=0.3)
    split = copy.deepcopy(one)
    expected = _step(one, [tokens], global_scope=True)
    got = _step(split, list(tokens.split(2)), global_scope=True)
    assert expected[1] > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(one.named_parameters(), split.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
