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
