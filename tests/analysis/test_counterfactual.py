"""Counterfactual routing (each token's k-th expert swapped for the next-best): the report equals
a hand-built swap replayed through moekit's own trace replay, and ``moekit inspect
--counterfactual`` reports it."""

import json

import torch
import torch.nn.functional as F

import moekit
from moekit.analysis.counterfactual import counterfactual_routing
from tests.builders import tiny_lm


def _losses(model, tokens):
    logits = model(tokens).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, 40), tokens[:, 1:].reshape(-1), reduction="none")


def test_the_report_equals_a_hand_built_swap():
    model = tiny_lm(n_layers=2, every=2, num_experts=4, top_k=2).eval()
    routers = moekit.layers.switches.moe_routers(model)
    assert len(routers) == 1  # one MoE layer: a recorded trace replays exactly
    router = routers[0][1]
    batches = [
        torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(s)) for s in range(2)
    ]
    report = counterfactual_routing(model, batches)
    changes = []
    with torch.no_grad():
        for tokens in batches:
            seen = []
            handle = router.register_forward_pre_hook(lambda _m, a, s=seen: s.append(a[0]))
            base = _losses(model, tokens)
            handle.remove()
            probs = torch.softmax(seen[0] @ router.weight_ED.t(), dim=-1)
            ranked = probs.topk(3, dim=-1).indices  # softmax top-k: the k+1 best by score
            swapped = torch.stack([ranked[:, 0], ranked[:, 2]], dim=1)
            trace = moekit.RoutingTrace(
                names=[routers[0][0]],
                num_experts=[4],
                expert_idx=[[swapped]],
                weights=[[torch.zeros(1)]],
            )
            with moekit.replay_routing(model, trace):
                changes.append(_losses(model, tokens) - base)
    change = torch.cat(changes)
    (entry,) = report
    assert entry["tokens"] == change.numel()
    assert abs(entry["mean_loss_change"] - float(change.mean())) < 1e-6
    assert abs(entry["better_fraction"] - float((change < 0).double().mean())) < 1e-9
    assert entry["mean_loss_change"] != 0.0


def test_inspect_reports_it(tmp_path, capsys):
    from moekit.cli.main import main
    from moekit.models import save_pretrained

    save_pretrained(tiny_lm(vocab_size=256), tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 100)
    args = [
        "inspect",
        str(tmp_path / "model"),
        "--data",
        str(text),
        "--batches",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--counterfactual",
        "--quiet",
        "--out",
        str(tmp_path / "report"),
    ]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.count("swapping the k-th expert for the next-best") == 2
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(report["counterfactual"]) == 2
    assert "Counterfactual routing" in (tmp_path / "report" / "report.html").read_text()
