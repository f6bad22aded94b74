"""moekit finetune end to end: presets leave the rest untouched, LoRA runs reload, instruction
tuning trains on responses, resume is bit-exact, bad input fails before any step."""

import json

import pytest
import torch

from moekit.cli.finetune import build_config
from moekit.cli.main import build_parser, main
from moekit.models.checkpoint import from_pretrained
from moekit.training import load_train_config, train
from moekit.training.checkpoint import resolve_checkpoint
from tests.builders import TINY_MOE

# every other block an MoE layer, so the dense "ffn" group exists
PRETRAIN = [*TINY_MOE, "model.moe.every=2", "steps=4"]
SMALL = ["--set", "data.seq_len=32", "--set", "data.batch_size=4", "--set", "eval_batches=2"]


@pytest.fixture
def pretrained(tmp_path, tiny_text):
    config = load_train_config(
        None, [*PRETRAIN, f"out_dir={tmp_path / 'pre'}", f"data.path={tiny_text}"]
    )
    train(config, progress=False)
    return tmp_path / "pre"


def _weights(folder):
    return dict(from_pretrained(resolve_checkpoint(str(folder))).state_dict())


def test_the_ffn_preset_changes_only_the_dense_ffn(pretrained, tiny_text, tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["finetune", "--from", str(pretrained), "--preset", "ffn", "--steps", "3"]
    assert main([*args, "--data", str(tiny_text), "--out-dir", str(out), "--quiet", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "trainable" in printed and (out / "parameters.txt").is_file()
    before, after = _weights(pretrained), _weights(out)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == name.startswith("blocks.0.ffn."), name


def test_lora_run_reloads_with_its_adapters_and_keeps_the_base(pretrained, tiny_text, tmp_path):
    out = tmp_path / "lora"
    args = ["finetune", "--from", str(pretrained), "--lora-rank", "2", "--steps", "3"]
    assert main([*args, "--data", str(tiny_text), "--out-dir", str(out), "--quiet", *SMALL]) == 0
    before, after = _weights(pretrained), _weights(out)
    adapters = {n for n in after if n not in before}
    assert adapters and all("lora" in n or ".adapter." in n for n in adapters)
    assert any(".experts.adapter." in n for n in adapters)
    for name in before:  # LoRA trains the adapters only
        assert torch.equal(before[name], after[name]), name
    assert any(after[n].abs().sum() > 0 for n in adapters if "B" in n.rsplit(".", 1)[-1])
    assert (
        main(["eval", str(out), "--data", str(tiny_text), "--batches", "1", "--seq-len", "32"]) == 0
    )


def test_instruction_tuning_trains_on_responses(pretrained, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"say {i}", "response": f"{i} " * (1 + i % 4)}) + "\n"
            for i in range(40)
        )
    )
    out = tmp_path / "instruct"
    args = ["finetune", "--from", str(pretrained), "--instruction", "--data", str(data)]
    small = [*SMALL, "--set", "data.seq_len=64", "--set", "model.max_seq_len=64"]
    assert main([*args, "--steps", "3", "--out-dir", str(out), "--quiet", *small]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in records)  # finite, not NaN
    assert "val_loss" in records[-1]


def test_experts_by_routing_frequency_on_packed_instruction_data(pretrained, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n" for i in range(40))
    )
    out = tmp_path / "esft"
    args = ["finetune", "--from", str(pretrained), "--instruction", "--data", str(data)]
    args += ["--preset", "experts:top=1", "--steps", "2", "--out-dir", str(out), "--quiet"]
    assert main([*args, *SMALL, "--set", "data.seq_len=64"]) == 0
    before, after = _weights(pretrained), _weights(out)
    w_in = "blocks.1.ffn.experts.w_in_EDH"
    changed = [e for e in range(4) if not torch.equal(before[w_in][e], after[w_in][e])]
    assert len(changed) == 1  # only the most-routed expert of the layer trains
    assert all(torch.equal(before[n], after[n]) for n in before if "experts" not in n)


def test_resuming_a_finetuning_run_is_bit_exact(pretrained, tiny_text, tmp_path):
    def config(out):
        args = build_parser().parse_args(
            [
                "finetune",
                "--from",
                str(pretrained),
                "--preset",
                "attention+router",
                "--lora-rank",
                "2",
                "--lora-targets",
                "experts",
                "--steps",
                "4",
                "--data",
                str(tiny_text),
                "--out-dir",
                str(out),
                *SMALL,
                "--set",
                "checkpoint_every=2",
            ]
        )
        return build_config(args)

    full = train(config(tmp_path / "full"), progress=False)
    train(config(tmp_path / "cut"), progress=False, stop_after=2)
    resumed = train(config(tmp_path / "cut"), resume=True, progress=False)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--preset", "everything"], "unknown preset 'everything'"),
        (["--preset", "shared_experts"], "matches no parameter"),
        (["--lora-rank", "-1"], "lora rank must be >= 1"),
        (["--lora-rank", "2", "--lora-targets", "shared_experts"], "match no module"),
    ],
)
def test_bad_settings_fail_before_any_step(pretrained, tiny_text, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    args = ["finetune", "--from", str(pretrained), "--data", str(tiny_text), "--out-dir", str(out)]
    assert main([*args, "--quiet", *SMALL, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists()


def test_instruction_file_without_the_fields_fails_before_any_step(pretrained, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    out = tmp_path / "bad"
    args = ["finetune", "--from", str(pretrained), "--instruction", "--data", str(data)]
    assert main([*args, "--out-dir", str(out), "--quiet", *SMALL]) == 2
    assert 'needs "prompt" and "response"' in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists()


def test_expert_lora_is_refused_under_expert_parallelism():
    with pytest.raises(ValueError, match=r"not with parallel\.ep > 1"):
        load_train_config(None, [*TINY_MOE, "parallel.ep=2", "finetune.lora.rank=2"])
