"""Fine-tuning presets freeze exactly their groups: unchanged tensors, no optimizer state."""

import pytest
import torch

from moekit.analysis.inspect import count_routing
from moekit.experts.shared import SharedExpertConfig
from moekit.models import TransformerConfig, TransformerLM
from moekit.models.common.attention import AttentionConfig
from moekit.training.config import OptimConfig
from moekit.training.optim import build_optimizer
from moekit.training.presets import (
    PRESETS,
    apply_selection,
    parameter_groups,
    select_parameters,
    trainable_summary,
)
from tests.builders import tiny_lm


def _model():
    return tiny_lm(every=2, shared_experts=SharedExpertConfig(hidden=8))


def _steps(model, n=2):
    optimizer = build_optimizer(model, OptimConfig(lr=0.05, weight_decay=0.1))
    tokens = torch.randint(0, 40, (2, 8))
    for _ in range(n):
        out = model(tokens)
        loss = out.logits.logsumexp(-1).mean() + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def test_every_parameter_is_in_exactly_one_group():
    model = _model()
    groups = parameter_groups(model)
    names = [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert groups["ffn"] and groups["router"] and groups["shared_experts"] and groups["attention"]
    assert "blocks.0.ffn.w_in_DH" in groups["ffn"]  # the dense FFN between MoE layers
    assert all(".ffn.experts." in n for n in groups["experts"])


@pytest.mark.parametrize(
    "preset",
    [
        "all",
        "non_moe",
        "moe",
        "attention",
        "ffn",
        "router",
        "shared_experts",
        "embeddings",
        "attention+router",
    ],
)
def test_each_preset_trains_exactly_its_groups(preset):
    model = _model()
    apply_selection(model, select_parameters(model, preset))
    trained_groups = {g for part in preset.split("+") for g in PRESETS[part]}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = _steps(model)
    state_of = {id(p) for p in optimizer.state}
    for group, params in parameter_groups(model).items():
        for name, p in params.items():
            if group in trained_groups:
                assert p.requires_grad and id(p) in state_of, name
            else:  # frozen: unchanged, and no optimizer state at all
                assert not p.requires_grad and id(p) not in state_of, name
                assert torch.equal(p, before[name]), name
    assert any(
        not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad
    )


def test_a_subset_of_experts_trains_and_the_others_stay_exactly_unchanged():
    model = _model()
    apply_selection(model, select_parameters(model, "experts:1,3"))
    bank = model.blocks[1].ffn.experts
    before = bank.w_in_EDH.detach().clone(), bank.w_out_EHD.detach().clone()
    _steps(model, 3)
    for now, then in zip((bank.w_in_EDH, bank.w_out_EHD), before, strict=True):
        assert torch.equal(now[[0, 2]], then[[0, 2]])
        assert not torch.equal(now[[1, 3]], then[[1, 3]])
    rows = dict((g, (t, n)) for g, t, n in trainable_summary(model))
    assert rows["experts"][0] == rows["experts"][1] // 2  # 2 of 4 experts
    assert rows["attention"][0] == 0


def test_experts_by_routing_frequency_picks_the_most_routed():
    model = _model()
    counts = count_routing(model, [torch.randint(0, 40, (4, 8)) for _ in range(3)])
    assert set(counts) == {"blocks.1.ffn"} and int(counts["blocks.1.ffn"].sum()) == 3 * 4 * 8 * 2
    selection = select_parameters(model, "experts:top=1", routing_counts=counts)
    mask = next(iter(selection.partial.values()))[1]
    assert mask.tolist() == [i == int(counts["blocks.1.ffn"].argmax()) for i in range(4)]


@pytest.mark.parametrize(
    "preset, message",
    [
        ("everything", "unknown preset 'everything'"),
        ("experts:a,b", "must list expert indices"),
        ("experts:7", "names expert 7"),
        ("experts:top=2", "needs routing counts"),
    ],
)
def test_bad_presets_are_refused(preset, message):
    with pytest.raises(ValueError, match=message):
        select_parameters(_model(), preset)


def test_a_preset_matching_nothing_is_refused():
    dense = TransformerLM(
        TransformerConfig(
            vocab_size=40,
            d_model=16,
            n_layers=1,
            attention=AttentionConfig(n_heads=2),
            ffn_hidden=8,
        )
    )
    for preset in ("router", "shared_experts", "experts:0"):
        with pytest.raises(ValueError, match="matches no parameter"):
            select_parameters(dense, preset)
