"""benchmarks/bench_gpu.py runs every section on the CPU in --tiny mode (its GPU figures come
from the same code on a GPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"


def test_bench_gpu_tiny_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.json"
    assert bench.main(["--tiny", "--device", "cpu", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    sections = {r["section"] for r in results}
    assert {"correct", "layer", "train", "decode"} <= sections
    assert not [r for r in results if r["status"] == "FAIL"]
    assert sum(r["status"] == "PASS" for r in results) >= 10


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_peaks_match_the_part_not_a_variant_of_its_name():
    """Issue 32: an "H200 NVL" was credited with the H200 SXM's peak."""
    bench = _bench()
    assert bench.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert bench.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_bf16_tflops("NVIDIA H200 NVL") is None
    assert bench.peak_bf16_tflops("NVIDIA H100 PCIe") is None
    assert bench.peak_bf16_tflops("cpu") is None


def test_the_correctness_section_leaves_tf32_as_it_found_it():
    """Issue 32: the section turned TF32 on for the sections after it."""
    import torch

    bench = _bench()
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for setting in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = setting
            with bench.exact_fp32_matmuls():
                assert torch.backends.cuda.matmul.allow_tf32 is False
            assert torch.backends.cuda.matmul.allow_tf32 is setting
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_the_train_section_times_moekit_train_with_and_without_working_weights(tmp_path, capsys):
    """Under bf16 the section runs `moekit train` both ways (the rows a GPU run reports)."""
    import warnings

    bench = _bench()
    out = tmp_path / "gpu.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16 warns
        code = bench.main(
            ["--tiny", "--device", "cpu", "--cpu-bf16", "--sections", "train", "--json", str(out)]
        )
    assert code == 0
    names = [r["name"] for r in json.loads(out.read_text())["results"] if r["section"] == "train"]
    assert any("bf16 working weights (default)" in n for n in names)
    assert any("autocast of fp32 weights" in n for n in names)
    assert "working weights / autocast:" in capsys.readouterr().out
