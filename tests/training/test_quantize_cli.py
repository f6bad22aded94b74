"""``moekit quantize`` end to end: the quantised checkpoint works with eval, generate, inspect
and finetune; QLoRA trains adapters only, on a bank that stays exactly as quantised."""

import pytest
import torch

from moekit.cli.main import main
from moekit.experts.quantized import QuantizedExpertBank
from moekit.models.checkpoint import from_pretrained
from moekit.training import load_train_config, train
from moekit.training.checkpoint import resolve_checkpoint
from tests.builders import TINY_MOE

SMALL = ["--set", "data.seq_len=32", "--set", "data.batch_size=4", "--set", "eval_batches=2"]


@pytest.fixture
def run(tmp_path, tiny_text):
    folder = tmp_path / "run"
    config = load_train_config(
        None, [*TINY_MOE, "steps=3", f"out_dir={folder}", f"data.path={tiny_text}"]
    )
    train(config, progress=False)
    return folder


def test_quantize_then_eval_generate_inspect_and_qlora(run, tmp_path, tiny_text, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", str(run), str(out), "--bits", "4", "--group-size", "16"]) == 0
    assert "smaller" in capsys.readouterr().out
    model = from_pretrained(out)
    banks = [m for m in model.modules() if isinstance(m, QuantizedExpertBank)]
    assert len(banks) == 2 and banks[0].quantization.group_size == 16
    data = ["--data", str(tiny_text), "--batches", "1", "--seq-len", "32"]
    assert main(["eval", str(out), *data]) == 0
    assert main(["generate", str(out), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    report = ["--out", str(tmp_path / "report"), "--expert-budget", "20KB", "--quiet"]
    assert main(["inspect", str(out), *data, *report]) == 0
    assert "hit rate LRU" in capsys.readouterr().out
    # QLoRA: adapters on the quantised experts and attention
    ft = tmp_path / "qlora"
    args = ["finetune", "--from", str(out), "--lora-rank", "2", "--steps", "2", "--quiet"]
    assert main([*args, "--data", str(tiny_text), "--out-dir", str(ft), *SMALL]) == 0
    before = model.state_dict()
    after = from_pretrained(resolve_checkpoint(str(ft))).state_dict()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name  # codes, scales and the rest unchanged
    assert any(".experts.adapter." in n and after[n].abs().sum() > 0 for n in after if "B_" in n)
    assert main(["eval", str(ft), *data]) == 0
    # parameters.txt counts the quantised experts as the weights they stand for (issue 30: it
    # left them out, 95,040 instead of 193,344 at the size)
    full = from_pretrained(resolve_checkpoint(str(run)))
    adapters = sum(v.numel() for n, v in after.items() if ".lora_" in n or ".adapter." in n)
    total = int((ft / "parameters.txt").read_text().splitlines()[-1].split()[-1].replace(",", ""))
    assert total == sum(p.numel() for p in full.parameters()) + adapters


def test_a_lora_run_quantises_with_its_adapters_merged(run, tmp_path, tiny_text, capsys):
    """Issue 30: a LoRA run was refused with only a Python call as the way out."""
    ft = tmp_path / "lora"
    args = ["finetune", "--from", str(run), "--lora-rank", "2", "--steps", "2", "--quiet"]
    assert main([*args, "--data", str(tiny_text), "--out-dir", str(ft), *SMALL]) == 0
    capsys.readouterr()
    out = tmp_path / "q8"
    assert main(["quantize", str(ft), str(out), "--bits", "8"]) == 0
    assert "LoRA adapters merged" in capsys.readouterr().err
    quantized = from_pretrained(out)
    assert not any(".lora_" in n or ".adapter." in n for n in quantized.state_dict())
    from moekit.training.finetune import load_source

    merged = load_source(str(ft)).eval()  # the LoRA run with its adapters folded in
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        want, got = merged(tokens).logits, quantized.eval()(tokens).logits
    assert (want - got).abs().max() < 0.05 * want.abs().max()  # int8 rounding only


def test_quantize_refuses_bad_arguments_by_name(run, tmp_path, capsys):
    assert main(["quantize", str(run), str(tmp_path / "a"), "--group-size", "12"]) == 2
    assert "group_size=12 does not divide d_model=32" in capsys.readouterr().err
    assert main(["quantize", str(run), str(tmp_path / "b"), "--format", "mxfp4", "--bits", "8"])
    assert "--format mxfp4 stores 4 bits" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
