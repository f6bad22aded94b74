"""The layer benchmark's dtype option: every implementation in the asked dtype, and bf16 refused
where the CPU would only emulate it."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_moe_layer

pytest.importorskip("transformers")


@pytest.mark.parametrize("impl", ["moekit", "dense", "floor", "hf"])
def test_build_puts_every_implementation_in_the_dtype(impl):
    module, forward = bench_moe_layer.build(impl, 4, dtype=torch.bfloat16)
    tensors = [*module.parameters(), *module.buffers()]
    floating = [t for t in tensors if t.is_floating_point()]
    assert floating and all(t.dtype == torch.bfloat16 for t in floating)
    x = torch.randn(8, bench_moe_layer.D_MODEL, dtype=torch.bfloat16)
    with torch.no_grad():
        assert forward(x).dtype == torch.bfloat16


def test_moekit_and_hf_agree_in_bf16():
    x = torch.randn(16, bench_moe_layer.D_MODEL, dtype=torch.bfloat16)
    with torch.no_grad():
        ours = bench_moe_layer.build("moekit", 4, dtype=torch.bfloat16)[1](x).float()
        theirs = bench_moe_layer.build("hf", 4, dtype=torch.bfloat16)[1](x).float()
    torch.testing.assert_close(ours, theirs, rtol=0.05, atol=0.02)


def test_bf16_is_refused_on_a_cpu_without_native_bf16(monkeypatch, capsys):
    monkeypatch.setattr("moekit.utils.device.cpu_has_native_bf16", lambda: False)
    small = ["--tokens", "8", "--experts", "4", "--rounds", "1", "--no-memory", "--no-hf"]
    monkeypatch.setattr(sys, "argv", ["bench_moe_layer.py", "--dtype", "bfloat16", *small])
    with pytest.raises(SystemExit):
        bench_moe_layer.main()
    assert "no native bf16" in capsys.readouterr().err
