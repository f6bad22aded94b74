"""The language model's training methods freeze exactly the groups they name."""

import pytest
import torch

from moekit.training import load_train_config, train
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


@pytest.mark.parametrize("method", ["em", "evolutionary"])
def test_classic_only_methods_are_refused_for_the_lm(method):
    with pytest.raises(ValueError, match="for the classic mixtures"):
        load_train_config(None, [f"method={method}"])
