"""``moekit train`` under ``torchrun`` with expert parallelism (marked ``distributed``)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moekit.cli.main import main
from tests.builders import TINY_MOE

pytestmark = pytest.mark.distributed


def _torchrun(nproc: int, args: list[str]) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    # faulthandler: a rank that aborts prints where it was (Python stacks of every thread)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        str(torchrun),
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(port),
        "-m",
        "moekit.cli.main",
        "train",
        *args,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-8000:]


def test_train_with_expert_parallel_2_then_resume_and_evaluate(tmp_path, tiny_text):
    run = tmp_path / "run"
    args = [
        "--out-dir",
        str(run),
        "--quiet",
        "--expert-parallel",
        "2",
        "--set",
        f"data.path={tiny_text}",
    ]
    for item in TINY_MOE:
        args += ["--set", item]
    _torchrun(2, [*args, "--set", "steps=6", "--set", "checkpoint_every=3"])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert sum(lines[0]["moe"][0]["tokens_per_expert"]) == 2 * 4 * 32 * 2  # global: 2 ranks
    _torchrun(2, [*args, "--resume"])  # continue the same run to its 12 steps
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 12
    # the checkpoint is in the single-process layout: one process can evaluate it
    assert (
        main(["eval", str(run), "--data", str(tiny_text), "--batches", "1", "--seq-len", "32"]) == 0
    )
