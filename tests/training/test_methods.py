"""The language model's training methods freeze exactly the groups they name."""

import json

import pytest
import torch

from moekit.training import load_train_config, train, train_evolved
from moekit.training.methods import lm_parameter_groups
from tests.builders import TINY_MOE


def _run(tmp_path, tiny_text, extra, steps):
    config = load_train_config(
        None,
        [*TINY_MOE, f"steps={steps}", f"out_dir={tmp_path}", f"data.path={tiny_text}", *extra],
    )
    torch.manual_seed(0)
    return config


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "extra, frozen",
    [
        (["method=separate", "separate_expert_steps=3"], "router"),  # 3 steps: experts phase
        (
            ["method=alternating", "alternating.expert_steps=2", "alternating.router_steps=2"],
            "router",
        ),
    ],
)
def test_the_first_block_leaves_the_routers_unchanged(tmp_path, tiny_text, extra, frozen):
    from moekit.models import TransformerLM

    config = _run(tmp_path, tiny_text, extra, steps=2)
    torch.manual_seed(config.seed)
    initial = TransformerLM(config.model)
    result = train(config, progress=False)
    groups = lm_parameter_groups(result.model)
    names = {id(p): n for n, p in result.model.named_parameters()}
    start = dict(initial.named_parameters())
    for p in groups[frozen]:
        assert torch.equal(p.detach(), start[names[id(p)]].detach()), names[id(p)]
    assert any(not torch.equal(p.detach(), start[names[id(p)]]) for p in groups["experts"])


def test_router_phase_leaves_everything_else_unchanged(tmp_path, tiny_text):
    from moekit.models import TransformerLM

    config = _run(tmp_path, tiny_text, ["method=separate", "separate_expert_steps=0"], steps=2)
    # separate_expert_steps=0 means half the steps: step 0 experts, step 1 router only
    torch.manual_seed(config.seed)
    initial = TransformerLM(config.model)
    result = train(config, progress=False)
    losses = [r["loss"] for r in result.records]
    assert len(losses) == 2
    groups = lm_parameter_groups(result.model)
    assert groups["router"] and groups["experts"] and groups["other"]
    assert any(
        not torch.equal(p.detach(), dict(initial.named_parameters())[n].detach())
        for n, p in result.model.named_parameters()
        if "router" in n
    )


def test_em_is_refused_for_the_lm():
    # em is the classic mixtures' method (moekit.classic): not among the LM's
    with pytest.raises(
        ValueError, match=r"method='em' \(expectation-maximisation\) trains classic"
    ):
        load_train_config(None, ["method=em"])
    # one enum for both (issue 31): the classic mixtures' and the language model's
    from moekit.classic import TrainingMethod as Classic
    from moekit.training import TrainingMethod as LanguageModel

    assert Classic is LanguageModel


def test_evolutionary_search_keeps_to_its_budget_and_trains_the_fittest(tmp_path, tiny_text):
    """CMA-ES over 2 x 3 router configurations with a budget of 3 short runs: exactly 3 distinct
    candidates trained (plus refused ones, which cost nothing), the winner is the candidate with
    the lowest validation loss, and it is then trained for the full steps."""
    space = '["model.moe.layer.top_k=1,2,5", "model.moe.layer.num_experts=2,4"]'
    config = _run(
        tmp_path,
        tiny_text,
        [
            "method=evolutionary",
            "evolution.budget=3",
            "evolution.steps=2",
            "evolution.population=4",
            f"evolution.space={space}",
        ],
        steps=3,
    )
    with pytest.raises(ValueError, match="train_evolved"):
        train(config, progress=False)
    result = train_evolved(config, progress=False)
    trials = result.search.trials
    trained = [t for t in trials if t.error is None]
    assert len(trained) == 3
    assert len({json.dumps(t.choices, sort_keys=True) for t in trials}) == len(trials)
    for t in trials:  # top_k=5 > num_experts is refused, not trained
        assert (t.error is not None) == (t.choices["model.moe.layer.top_k"] > 2)
    best = min(trained, key=lambda t: t.val_loss)
    layer = result.model.config.moe.layer
    assert (layer.top_k, layer.num_experts) == (
        best.choices["model.moe.layer.top_k"],
        best.choices["model.moe.layer.num_experts"],
    )
    assert [r["step"] for r in result.records if "loss" in r][-1] == 3
    summary = json.loads((tmp_path / "evolution" / "summary.json").read_text())
    assert summary["best"]["choices"] == best.choices
    # a resumed search reads the finished trials back instead of retraining them
    again = train_evolved(config, resume=True, progress=False)
    assert [t.choices for t in again.search.trials] == [t.choices for t in trials]


@pytest.mark.parametrize(
    "override, message",
    [
        ("evolution.space=[]", "evolution.space is empty"),
        ('evolution.space=["model.moe.layer.top_k"]', "entries look like"),
        ("evolution.budget=0", "evolution.budget must be >= 1"),
        ("evolution.population=1", "evolution.population must be >= 2"),
    ],
)
def test_bad_evolution_settings_are_refused_before_any_step(override, message):
    with pytest.raises(ValueError, match=message):
        load_train_config(None, [*TINY_MOE, "method=evolutionary", override])
