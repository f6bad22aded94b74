"""Fine-tuning keeps routing healthy by default (issue 33, item 4): a source without balancing
gets the Switch loss, the progress lines show the worst layer's load and dead experts, and a
collapsed layer is warned about once, with the threshold named."""

from __future__ import annotations

import sys

import pytest
import torch

from moekit.cli.finetune import FINETUNE_SWITCH_WEIGHT, _balance_by_default
from moekit.training.loop import RoutingHealth, StepOutput, worst_load


def _layer(**aux) -> dict:
    return {"moe": {"layer": {"aux_loss": aux, "router": {"kind": "top_k"}}}}


def test_a_source_without_balancing_fine_tunes_with_the_switch_loss(capsys):
    model = _layer(switch=0.0, z_loss=0.001)
    _balance_by_default(model)
    assert model["moe"]["layer"]["aux_loss"]["switch"] == FINETUNE_SWITCH_WEIGHT == 0.01
    assert model["moe"]["layer"]["aux_loss"]["z_loss"] == 0.001
    assert "Switch balancing loss at 0.01" in capsys.readouterr().err
    kept = _layer(switch=0.0, load=0.02)  # balanced otherwise: left as it is
    _balance_by_default(kept)
    assert kept["moe"]["layer"]["aux_loss"]["switch"] == 0.0
    biased = {"moe": {"layer": {"aux_loss": {"switch": 0.0}, "router": {"bias_balancing": True}}}}
    _balance_by_default(biased)
    assert biased["moe"]["layer"]["aux_loss"]["switch"] == 0.0


def _step(done: int, counts: list[list[int]]) -> StepOutput:
    from moekit.analysis.inspect import load_summary

    moe = [{"tokens_per_expert": c, "load": load_summary(torch.tensor(c))} for c in counts]
    step = StepOutput.__new__(StepOutput)
    step.done, step.writes_record, step.record = done, True, {"moe": moe, "loss": 1.0}
    return step


def test_a_collapsed_layer_is_warned_about_once_with_its_threshold(capsys):
    health = RoutingHealth()
    healthy, collapsed = [10, 12, 9, 11], [40, 1, 0, 0]
    busy = [20, 20, 1, 1]  # an expert every token takes, at top-2: not a collapse
    health.on_step_end(None, _step(4, [busy]))  # type: ignore[arg-type]
    assert "collapsed" not in capsys.readouterr().err
    step = _step(5, [healthy, collapsed])
    health.on_step_end(None, step)  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "routing in MoE layer 1 collapsed by step 5: 2 of 4 experts dead" in err
    assert "threshold: half the experts below 1% of an equal share" in err
    assert step.record["routing_collapse"] == [1]
    health.on_step_end(None, _step(6, [healthy, collapsed]))  # type: ignore[arg-type]
    assert "collapsed" not in capsys.readouterr().err  # once per layer
    assert worst_load(step.record) == (pytest.approx(40 / 41 * 4), 2)


def test_progress_lines_show_the_worst_layers_load(tmp_path, tiny_text, capsys, monkeypatch):
    from moekit.training import load_train_config, train
    from tests.builders import TINY_MOE

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    config = load_train_config(
        None,
        [
            *TINY_MOE,
            "steps=2",
            "eval_every=2",
            f"data.path={tiny_text}",
            f"out_dir={tmp_path / 'run'}",
        ],
    )
    train(config, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if "step 2/2" in line]
    assert lines and " load max " in lines[-1] and " dead " in lines[-1]
