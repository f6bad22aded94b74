"""``moekit train`` under ``torchrun`` with expert parallelism (marked ``distributed``)."""

import json
import os
import shutil
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
    # no per-rank warning a user cannot act on (issue 30: FSDP2's view-tensor warning)
    assert "Warning" not in done.stderr, done.stderr[-4000:]


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


@pytest.mark.parametrize(
    "mesh",
    [
        ["--set", "parallel.ep=2", "--set", "parallel.dp_shard=4"],
        ["--dp-replicate", "2", "--dp-shard", "2", "--ep", "2"],
        ["--expert-parallel", "4"],
    ],
    ids=["ep2-fsdp4", "hsdp2x2-ep2", "expert-parallel-4"],
)
def test_a_4_rank_mesh_logs_the_losses_of_one_process_and_resumes(tmp_path, tiny_text, mesh):
    """The same global batch (8 sequences: 2 per rank, or 8 in one process) gives the same
    logged losses; the run resumes on its mesh and its checkpoint loads in one process."""
    common = ["--quiet", "--set", f"data.path={tiny_text}"]
    for item in [*TINY_MOE, "steps=4", "checkpoint_every=2", "optim.grad_clip=0.5"]:
        common += ["--set", item]
    single, meshed = tmp_path / "one", tmp_path / "mesh"
    assert main(["train", *common, "--out-dir", str(single), "--set", "data.batch_size=8"]) == 0
    _torchrun(4, [*common, "--out-dir", str(meshed), "--set", "data.batch_size=2", *mesh])

    def losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"], r["aux_loss"]) for r in map(json.loads, lines)]

    for (s1, l1, a1), (s2, l2, a2) in zip(losses(single), losses(meshed), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4) and a1 == pytest.approx(a2, rel=1e-4)
    more = ["--set", "steps=6", "--set", "data.batch_size=2"]
    _torchrun(4, [*common, "--out-dir", str(meshed), *mesh, *more, "--resume"])
    assert losses(meshed)[-1][0] == 6
    # resuming on the same mesh is bit-exact: back to step 4, then on to 6 again
    before = losses(meshed)
    checkpoints = meshed / "checkpoints"
    shutil.rmtree(checkpoints / "step_0000006")
    (checkpoints / "latest").write_text("step_0000004\n")
    _torchrun(4, [*common, "--out-dir", str(meshed), *mesh, *more, "--resume"])
    assert losses(meshed) == before
    data = ["--data", str(tiny_text), "--batches", "1", "--seq-len", "32"]
    assert main(["eval", str(meshed), *data]) == 0  # one process reads every rank's part
    step = meshed / "checkpoints" / "step_0000006"
    assert (step / "sharded" / ".metadata").is_file() and not (step / "model.safetensors").exists()
    assert main(["consolidate", str(meshed), str(tmp_path / "one_file")]) == 0
    assert main(["eval", str(tmp_path / "one_file"), *data]) == 0


def test_sizes_that_do_not_factor_are_named_before_any_collective(tmp_path, capsys):
    from moekit.distributed.mesh import ParallelConfig

    with pytest.raises(ValueError, match=r"parallel.ep=3 must divide parallel.dp_shard=4"):
        ParallelConfig(ep=3).resolve(4)
    with pytest.raises(ValueError, match=r"dp_replicate=2 × parallel.dp_shard=3 = 6, not the 4"):
        ParallelConfig(dp_replicate=2, dp_shard=3).resolve(4)
    with pytest.raises(ValueError, match=r"parallel.ep=4 must divide the 6 experts"):
        ParallelConfig(ep=4).resolve(8, num_experts=6)
    assert ParallelConfig(ep=4).resolve(8, num_experts=4).efsdp == 2  # more ranks than experts
    # issue 33: in one process, say it needs torchrun (not a dp_shard the user never set)
    with pytest.raises(ValueError, match=r"need several processes.*torchrun --nproc-per-node 2"):
        ParallelConfig(ep=2).resolve(1)
    assert main(["train", "--expert-parallel", "2", "--set", "steps=1"]) == 2
    assert "torchrun --nproc-per-node N (N a multiple of 2)" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split()
        found += [int(c) for c in children]
    return found


def test_a_killed_rank_tears_every_rank_down(tmp_path, tiny_text):
    """SIGKILL one of 2 ranks mid-run: torchrun stops the other and exits with an error; no
    process is left behind."""
    import signal
    import time

    torchrun = Path(sys.executable).with_name("torchrun")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["--quiet", "--out-dir", str(tmp_path / "run"), "--set", f"data.path={tiny_text}"]
    for item in [*TINY_MOE, "steps=100000", "log_every=1"]:
        args += ["--set", item]
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(port)]
    cmd += ["-m", "moekit.cli.main", "train", *args, "--ep", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert launcher.poll() is None, launcher.stderr.read().decode()[-4000:]  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.5)
    workers = _children(launcher.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    try:
        code = launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert code != 0
    time.sleep(1.0)
    assert not [
        pid
        for pid in workers
        if Path(f"/proc/{pid}").exists()
        and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    ]
