import json

import pytest
import torch

from moekit.models import TransformerLM, from_pretrained
from moekit.training import load_train_config, train
from moekit.training.checkpoint import latest_checkpoint
from moekit.training.config import OptimConfig
from moekit.training.optim import build_optimizer, lr_factor
from tests.builders import TINY, TINY_MOE


def _config(tmp_path, name, extra=(), base=TINY_MOE, text=None):
    overrides = [*base, *extra, f"out_dir={tmp_path / name}"]
    if text is not None:
        overrides.append(f"data.path={text}")
    return load_train_config(None, overrides)


def test_a_few_steps_lower_the_loss_and_metrics_are_logged(tmp_path, tiny_text):
    cfg = _config(tmp_path, "run", ["steps=30", "eval_every=15"], text=tiny_text)
    result = train(cfg, progress=False)
    losses = [r["loss"] for r in result.records]
    assert losses[-1] < losses[0] - 1.0
    assert result.evals[-1][1] < result.evals[0][1]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 30
    first = lines[0]
    assert {"loss", "aux_loss", "lr", "tokens_per_second", "grad_norm", "moe"} <= set(first)
    assert len(first["moe"]) == 2 and len(first["moe"][0]["tokens_per_expert"]) == 4
    assert {"dropped_fraction", "router_entropy", "losses"} <= set(first["moe"][0])
    assert "val_loss" in lines[14] and "val_loss" in lines[29]


def test_resume_equals_uninterrupted_bit_exactly(tmp_path, tiny_text):
    extra = [
        "model.moe.layer.router.bias_balancing=true",
        "model.moe.layer.router.noisy_gating=true",
        "optim.grad_accum=2",
        "checkpoint_every=4",
    ]
    full = train(_config(tmp_path, "full", extra, text=tiny_text), progress=False)
    train(_config(tmp_path, "cut", extra, text=tiny_text), progress=False, stop_after=6)
    # the run died after step 6; its last checkpoint is step 6 (saved at the stop)
    resumed = train(_config(tmp_path, "cut", extra, text=tiny_text), progress=False, resume=True)
    assert [r["loss"] for r in resumed.records] == [r["loss"] for r in full.records]
    assert [r.get("val_loss") for r in resumed.records] == [r.get("val_loss") for r in full.records]
    for (name, a), (_, b) in zip(
        full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    bias = resumed.model.blocks[0].ffn.router.expert_bias_E
    assert bias.abs().sum() > 0  # the DeepSeek bias update is wired into the loop


def test_killed_save_leaves_the_previous_checkpoint_loadable(tmp_path, tiny_text, monkeypatch):
    import moekit.training.checkpoint as checkpoint

    cfg = _config(tmp_path, "run", ["checkpoint_every=4"], text=tiny_text)
    calls = {"n": 0}
    real_save_file = checkpoint.save_file

    def dying_save_file(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-way (after the model files)
            raise KeyboardInterrupt("killed")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", dying_save_file)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    checkpoints = tmp_path / "run" / "checkpoints"
    latest = latest_checkpoint(checkpoints)
    assert latest.name == "step_0000004"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_0000004"]
    assert isinstance(from_pretrained(latest), TransformerLM)
    monkeypatch.setattr(checkpoint, "save_file", real_save_file)
    resumed = train(cfg, progress=False, resume=True)
    assert resumed.records[-1]["step"] == 12


def test_existing_checkpoints_need_resume(tmp_path, tiny_text):
    cfg = _config(tmp_path, "run", ["steps=2"], text=tiny_text)
    train(cfg, progress=False)
    with pytest.raises(FileExistsError, match="resume"):
        train(cfg, progress=False)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (["optim.lrr=1"], ValueError, "unknown OptimConfig keys: optim.lrr"),
        (["optim.lr=-0.1"], ValueError, "optim.lr must be"),
        (["data.path=/no/such/place"], FileNotFoundError, "data.path"),
        (["model.vocab_size=300"], ValueError, "vocab_size must be 256"),
        (["data.seq_len=512"], ValueError, "exceeds model.max_seq_len"),
        (["steps"], ValueError, "section.key=value"),
    ],
)
def test_bad_configs_fail_before_training(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        load_train_config(None, [*TINY, *overrides, f"out_dir={tmp_path}"])


def test_empty_corpus_fails_before_any_step(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = _config(tmp_path, "run", text=tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no text"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_config_files_and_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(
        "steps = 7\n[optim]\nlr = 0.01\n[model.attention]\nn_heads = 8\n[model.moe.layer]\n"
        "num_experts = 4\ntop_k = 2\n[model.moe.layer.experts]\nhidden = 16\n"
    )
    cfg = load_train_config(
        str(toml), ["optim.lr=0.02", "model.moe.layer.router.gating=sigmoid_topk"]
    )
    assert cfg.steps == 7 and cfg.optim.lr == 0.02 and cfg.model.attention.n_heads == 8
    assert (
        cfg.model.attention.head_dim == 16 and cfg.model.attention.n_kv_heads == 8
    )  # derived from the file
    assert cfg.model.moe.layer.router.gating.value == "sigmoid_topk"
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"steps": 3}))
    assert load_train_config(str(js)).steps == 3
    with pytest.raises(ValueError, match="must end in"):
        (tmp_path / "c.ini").write_text("")
        load_train_config(str(tmp_path / "c.ini"))


def test_optimizer_groups_and_schedule():
    model = TransformerLM(load_train_config(None, TINY_MOE).model)
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(55, 100, cfg) == pytest.approx(0.55)


def test_routing_statistics_are_computed_only_on_steps_that_write_metrics(
    tmp_path, tiny_text, monkeypatch
):
    import moekit.layers
    import moekit.layers.moe

    computed = []
    real = moekit.layers.moe.routing_stats

    def counted(*args, **kwargs):
        computed.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(moekit.layers.moe, "routing_stats", counted)
    extra = ["steps=6", "log_every=3", "eval_every=6"]
    result = train(_config(tmp_path, "run", extra, text=tiny_text), progress=False)
    assert [r["step"] for r in result.records] == [3, 6]
    assert all(len(r["moe"][0]["tokens_per_expert"]) == 4 for r in result.records)
    # two logged steps x two MoE layers: not six steps, and none in evaluation (no grad)
    assert computed == [True] * 4
    assert all(m.statistics for m in result.model.modules() if isinstance(m, moekit.layers.MoE))
