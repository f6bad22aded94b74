"""moekit inspect: statistics equal hand counts; the CLI writes a self-contained report."""

import json
import math

import pytest
import torch

from moekit.analysis.inspect import RoutingInspector, inspect_model, mutual_information
from moekit.cli.main import main
from moekit.models import TransformerConfig, TransformerLM
from moekit.models.common.attention import AttentionConfig
from moekit.routing.result import RoutingResult
from moekit.training import load_train_config, train
from tests.builders import TINY_MOE, placement


def _routing(idx, probs):
    idx, probs = torch.tensor(idx), torch.tensor(probs)
    return RoutingResult(
        expert_idx_TK=idx, weights_TK=probs.gather(1, idx), logits_TE=probs.log(), probs_TE=probs
    )


def test_statistics_equal_hand_counts():
    inspector = RoutingInspector(["a", "b"], [4, 4], [2, 2], vocab_size=3, capacity_factor=1.0)
    # 4 tokens; expert 0 takes every token, expert 3 none
    idx = [[0, 1], [0, 2], [0, 1], [0, 2]]
    probs = [
        [0.5, 0.3, 0.1, 0.1],
        [0.6, 0.1, 0.2, 0.1],
        [0.4, 0.4, 0.1, 0.1],
        [0.7, 0.1, 0.15, 0.05],
    ]
    tokens = torch.tensor([0, 1, 0, 2])
    inspector.observe(0, _routing(idx, probs), tokens)
    inspector.observe(1, _routing([[3, 1]] * 4, probs), tokens)
    report = inspector.report()
    a = report["layers"][0]
    assert a["tokens_per_expert"] == [4, 2, 2, 0]
    assert a["load_fraction_of_ideal"]["max"] == 2.0 and a["load_fraction_of_ideal"]["min"] == 0.0
    assert a["dead_experts"] == 1
    # capacity ceil(1.0 * 8 / 4) = 2: expert 0 drops 2 of 8 assignments
    assert a["dropped_fraction_at_capacity"] == 0.25
    assert a["coactivation"][0] == [4, 2, 2, 0] and a["coactivation"][1][2] == 0
    entropy = sum(-sum(p * math.log(p) for p in row) for row in probs) / 4
    assert a["router_entropy"] == pytest.approx(entropy, abs=1e-6)
    # margins p(2nd) - p(3rd): 0.2, 0.1, 0.3, 0.05 -> median bin 0.1..0.2
    assert 0.08 <= a["margin_k_vs_k_plus_1"]["p50"] <= 0.22
    # layer b's top-1 is always expert 3: no information about layer a's
    assert report["consecutive_layer_agreement"][0]["top1_normalised_mutual_information"] == 0.0


def test_byte_models_report_the_byte_classes_each_expert_takes():
    inspector = RoutingInspector(["a"], [2], [1], vocab_size=256)
    tokens = torch.tensor([ord("a"), ord("b"), ord("7"), ord("8")])
    idx = [[0], [0], [1], [1]]  # expert 0 takes letters, expert 1 digits
    probs = [[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]]
    inspector.observe(0, _routing(idx, probs), tokens)
    experts = inspector.report()["layers"][0]["specialisation"]
    assert experts[0]["byte_class_lift"]["lowercase"] == 2.0
    assert experts[0]["byte_class_lift"]["digit"] == 0.0
    assert experts[1]["byte_class_lift"]["digit"] == 2.0


def test_mutual_information_of_a_perfect_assignment_is_the_entropy():
    joint = torch.eye(4) * 10
    assert mutual_information(joint) == pytest.approx(math.log(4))
    assert mutual_information(torch.ones(4, 4)) == pytest.approx(0.0, abs=1e-12)


def test_inspect_model_counts_every_assignment():
    torch.manual_seed(0)
    model = TransformerLM(
        TransformerConfig(
            vocab_size=32,
            d_model=16,
            n_layers=2,
            attention=AttentionConfig(n_heads=2),
            ffn_hidden=16,
            moe=placement(16, num_experts=4, top_k=2, expert_hidden=8),
        )
    )
    batches = [torch.randint(0, 32, (2, 5)) for _ in range(3)]
    report = inspect_model(model, batches, vocab_size=32)
    for layer in report["layers"]:
        assert sum(layer["tokens_per_expert"]) == 3 * 10 * 2 and layer["tokens"] == 30
    json.dumps(report)  # JSON-ready


def test_inspect_cli_writes_a_self_contained_report(tmp_path, tiny_text, capsys):
    run = tmp_path / "run"
    train(
        load_train_config(None, [*TINY_MOE, "steps=2", f"out_dir={run}", f"data.path={tiny_text}"]),
        progress=False,
    )
    out = tmp_path / "report"
    args = ["inspect", str(run), "--data", str(tiny_text), "--batches", "2", "--seq-len", "32"]
    assert main([*args, "--out", str(out), "--compare-batching", "--quiet"]) == 0
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "<script" not in page
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 2 and len(report["differences"]) == 2
    assert all(d["differing_fraction"] <= 0.05 for d in report["differences"])
    assert "load p5" in capsys.readouterr().out
    assert main(["inspect", str(run), "--data", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # issue 30: --batches 0 reported every expert dead with exit 0; a budget larger than the
    # experts printed "130208% of the experts"
    assert main([*args[:4], "--batches", "0", "--quiet"]) == 2
    assert "--batches must be >= 1, got 0" in capsys.readouterr().err
    budget = ["--expert-budget", "512MB", "--out", str(tmp_path / "r2"), "--quiet"]
    assert main([*args, *budget]) == 0
    printed = capsys.readouterr().out
    assert "every expert fits: they take" in printed and "%" not in printed.split("budget")[-1][:40]
