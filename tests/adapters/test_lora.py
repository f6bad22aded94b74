"""LoRA on every target, against plain references: init is a no-op, the grouped low-rank path
equals the looped math on outputs and gradients, merge equals unmerged, unmerge is exact."""

import pytest
import torch

from moekit.adapters import (
    DenseLoRA,
    ExpertLoRA,
    LoRAConfig,
    LoRALinear,
    add_lora,
    lora_parameters,
    merge_lora,
    unmerge_lora,
)
from moekit.experts.activations import apply_activation
from moekit.experts.bank import ExpertBank
from moekit.experts.grouped_linear import grouped_linear
from moekit.experts.shared import SharedExpertConfig
from tests.builders import tiny_lm


def _model(**layer):
    return tiny_lm(every=2, **layer)


def _randomise(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(0, 0.3)


ALL = ["attention", "experts", "shared_experts", "ffn"]


def test_a_fresh_adapter_leaves_the_logits_unchanged_and_freezes_the_rest():
    model = _model(shared_experts=SharedExpertConfig(hidden=8)).eval()
    tokens = torch.randint(0, 40, (2, 7))
    before = model(tokens).logits
    adapted = add_lora(model, LoRAConfig(rank=2, targets=ALL))
    assert torch.equal(model(tokens).logits, before)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"LoRALinear", "ExpertLoRA", "DenseLoRA"} <= kinds
    assert any("experts" in n for n in adapted) and any("shared_experts" in n for n in adapted)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(model)) and trainable


def test_merge_equals_the_unmerged_model_and_unmerge_restores_every_weight_exactly():
    model = _model(shared_experts=SharedExpertConfig(hidden=8)).eval()
    add_lora(model, LoRAConfig(rank=3, alpha=6.0, targets=ALL, ranks={"experts": 2}))
    _randomise(model)
    tokens = torch.randint(0, 40, (2, 9))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = model(tokens).logits
    merge_lora(model)
    assert not torch.equal(
        model.blocks[1].ffn.experts.w_in_EDH, weights["blocks.1.ffn.experts.w_in_EDH"]
    )
    torch.testing.assert_close(model(tokens).logits, unmerged, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]), name
    assert torch.equal(model(tokens).logits, unmerged)


def _looped_expert_ffn(bank: ExpertBank, lora: ExpertLoRA, x_MD, counts_E):
    """Expert by expert with the update materialised: ``W + s A B``, plain matmuls."""
    rows, start = [], 0
    for e, count in enumerate(counts_E.tolist()):
        x = x_MD[start : start + count]
        w_in = bank.w_in_EDH[e] + lora.scaling * lora.A_in_EDR[e] @ lora.B_in_ERW[e]
        w_out = bank.w_out_EHD[e] + lora.scaling * lora.A_out_EHR[e] @ lora.B_out_ERD[e]
        rows.append(apply_activation(bank.activation, x @ w_in) @ w_out)
        start += count
    return torch.cat(rows)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("rank", [1, 4])
def test_expert_lora_matches_the_looped_reference_on_outputs_and_gradients(activation, rank):
    torch.manual_seed(1)
    bank = ExpertBank(3, 8, 6, activation=activation)
    bank.adapter = ExpertLoRA(bank, rank, alpha=2.0, dropout=0.0)
    _randomise(bank)
    counts = torch.tensor([4, 0, 5])
    x = torch.randn(9, 8, requires_grad=True)
    params = [x, *bank.parameters()]
    fast = bank(x, counts)
    fast_grads = torch.autograd.grad(
        (fast * torch.linspace(-1, 1, fast.numel()).view_as(fast)).sum(), params
    )
    slow = _looped_expert_ffn(bank, bank.adapter, x, counts)
    slow_grads = torch.autograd.grad(
        (slow * torch.linspace(-1, 1, slow.numel()).view_as(slow)).sum(), params
    )
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_grouped_linear_gradcheck_float64():
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([2, 0, 5])
    assert torch.autograd.gradcheck(lambda x, w: grouped_linear(x, w, counts), (x, w))


def test_linear_and_dense_adapters_match_their_formulas():
    torch.manual_seed(2)
    base = torch.nn.Linear(6, 5)
    lora = LoRALinear(base, rank=2, alpha=4.0, dropout=0.0)
    torch.nn.init.normal_(lora.lora_B)
    x = torch.randn(3, 6)
    expected = x @ (base.weight + 2.0 * lora.lora_B @ lora.lora_A).T + base.bias
    torch.testing.assert_close(lora(x), expected)
    from moekit.experts.dense import FeedForward

    ffn = FeedForward(6, 4, activation="swiglu")
    ffn.adapter = DenseLoRA(ffn, rank=2, alpha=2.0, dropout=0.0)
    _randomise(ffn)
    a = ffn.adapter
    w_in = ffn.w_in_DH + a.scaling * a.A_in_DR @ a.B_in_RW
    w_out = ffn.w_out_HD + a.scaling * a.A_out_HR @ a.B_out_RD
    torch.testing.assert_close(ffn(x), apply_activation(ffn.activation, x @ w_in) @ w_out)


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(rank=0), "lora rank must be >= 1"),
        (dict(ranks={"experts": -1}, targets=["experts"]), "lora rank must be >= 1"),
        (dict(targets=[]), "lora.targets is empty"),
        (dict(ranks={"ffn": 2}, targets=["experts"]), "not in lora.targets"),
        (dict(dropout=1.0), "lora.dropout"),
    ],
)
def test_bad_lora_configs_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**config)


def test_a_target_matching_nothing_is_refused():
    model = _model()  # no shared experts
    with pytest.raises(ValueError, match=r"\['shared_experts'\] match no module"):
        add_lora(model, LoRAConfig(targets=["experts", "shared_experts"]))
    add_lora(model, LoRAConfig(targets=["q_proj"]))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2  # one per layer
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, LoRAConfig(targets=["experts"]))


def test_expert_dropout_acts_only_while_training():
    torch.manual_seed(3)
    plain = ExpertBank(2, 8, 16)
    dropped = ExpertBank(2, 8, 16, dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    x, counts = torch.randn(10, 8), torch.tensor([6, 4])
    dropped.eval()
    assert torch.equal(dropped(x, counts), plain(x, counts))  # eval: the fused path
    dropped.train()
    torch.manual_seed(0)
    noisy = dropped(x, counts)
    assert not torch.allclose(noisy, plain(x, counts))
    # the same mask by hand: dropout on the hidden activations, scaled by 1/(1-p)
    torch.manual_seed(0)
    h = apply_activation(
        plain.activation, torch.cat([x[:6] @ plain.w_in_EDH[0], x[6:] @ plain.w_in_EDH[1]])
    )
    h = torch.nn.functional.dropout(h, 0.5, training=True)
    expected = torch.cat([h[:6] @ plain.w_out_EHD[0], h[6:] @ plain.w_out_EHD[1]])
    torch.testing.assert_close(noisy, expected)


def test_lora_config_build_attaches_adapters_like_add_lora():
    built = LoRAConfig(rank=2, targets=["attention"]).build(model=_model())
    reference = _model()
    names = add_lora(reference, LoRAConfig(rank=2, targets=["attention"]))
    assert built.lora_config == reference.lora_config
    adapted = {n for n, m in built.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == set(names) and adapted
