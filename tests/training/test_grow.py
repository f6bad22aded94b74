"""Growing an MoE mid-training (expert upcycling): duplicated experts and router rows, the
grown model at k·m equal to the source at k, AdamW moments duplicated alike, and ``moekit
grow`` writing a run that ``moekit train --resume`` continues and trains."""

import json

import pytest
import torch

import moekit
from moekit.training import load_train_config
from moekit.training.grow import grow_experts, grow_optimizer_state
from moekit.training.optim import build_optimizer
from tests.builders import TINY_MOE, tiny_lm


def test_copies_are_the_source_experts_and_noise_only_moves_the_copies():
    model = tiny_lm(num_experts=4, top_k=2).eval()
    grown, sources = grow_experts(model, 3, noise=0.05, seed=1)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, moekit.MoE)]
    assert layers
    for name, moe in layers:
        new = grown.get_submodule(name)
        assert new.num_experts == 12 and new.top_k == 2
        assert sources[name].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
        torch.testing.assert_close(new.experts.w_in_EDH, moe.experts.w_in_EDH[sources[name]])
        torch.testing.assert_close(new.experts.w_out_EHD, moe.experts.w_out_EHD[sources[name]])
        rows, old = new.router.weight_ED, moe.router.weight_ED
        assert torch.equal(rows[0::3], old)  # the first copy keeps its row exactly
        assert not torch.equal(rows[1::3], old)  # the others are nudged
        torch.testing.assert_close(rows[1::3], old, atol=0.05, rtol=0.5)


def test_the_grown_model_at_k_times_m_computes_the_source_at_k():
    model = tiny_lm(num_experts=4, top_k=2).eval()
    grown, _ = grow_experts(model, 2, noise=0.0)
    grown.eval()
    moekit.set_top_k(grown, 4)  # every copy of the chosen experts, each at half the weight
    tokens = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(grown(tokens).logits, model(tokens).logits, rtol=1e-5, atol=1e-6)


def test_adam_moments_are_duplicated_along_the_expert_dimension():
    model = tiny_lm(num_experts=4, top_k=2)
    optimizer = build_optimizer(model, load_train_config(None, TINY_MOE).optim, fused=False)
    tokens = torch.randint(0, 40, (2, 10))
    model(tokens).logits.sum().backward()
    optimizer.step()
    grown, sources = grow_experts(model, 2, noise=0.0)
    new_optimizer = build_optimizer(grown, load_train_config(None, TINY_MOE).optim, fused=False)
    carried = grow_optimizer_state(model, optimizer, grown, new_optimizer, sources)
    assert carried == sum(1 for _ in model.parameters())
    name = next(n for n, _ in model.named_parameters() if n.endswith("router.weight_ED"))
    layer = name.rsplit(".router.", 1)[0]
    old = optimizer.state[dict(model.named_parameters())[name]]
    new = new_optimizer.state[dict(grown.named_parameters())[name]]
    assert torch.equal(new["exp_avg"], old["exp_avg"][sources[layer]])
    assert torch.equal(new["exp_avg_sq"], old["exp_avg_sq"][sources[layer]])
    assert torch.equal(new["step"], old["step"])
    embed = "embed.weight" if "embed.weight" in dict(model.named_parameters()) else None
    if embed:
        p_old, p_new = dict(model.named_parameters())[embed], dict(grown.named_parameters())[embed]
        assert torch.equal(new_optimizer.state[p_new]["exp_avg"], optimizer.state[p_old]["exp_avg"])


def test_grow_writes_a_run_that_resumes_and_trains(tmp_path, tiny_text, capsys):
    from moekit.cli.main import main

    run = tmp_path / "run"
    args = [
        "train",
        "--quiet",
        "--out-dir",
        str(run),
        "--set",
        f"data.path={tiny_text}",
        *[x for o in TINY_MOE for x in ("--set", o)],
        "--set",
        "steps=4",
        "--set",
        "checkpoint_every=4",
        "--set",
        "eval_every=4",
    ]
    assert main(args) == 0, capsys.readouterr().err
    grown = tmp_path / "grown"
    assert main(["grow", str(run), str(grown), "--factor", "2"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "step 4, 8 experts per MoE layer" in out and "--resume" in out
    resume = [
        "train",
        "--quiet",
        "--config",
        str(grown / "config.toml"),
        "--resume",
        "--set",
        "steps=8",
    ]
    assert main(resume) == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in (grown / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 6, 7, 8]  # continued from step 4
    assert all(len(r["moe"][0]["tokens_per_expert"]) == 8 for r in lines if "moe" in r)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in lines)
    with pytest.raises(SystemExit):
        main(["grow", str(run), str(tmp_path / "x"), "--factor", "x"])
    assert main(["grow", str(run), str(grown), "--factor", "2"]) == 2  # holds checkpoints
    assert main(["grow", str(run), str(tmp_path / "y"), "--factor", "1"]) == 2
    assert "factor must be an integer >= 2" in capsys.readouterr().err
