"""A resumed run equals the run that never stopped, whatever the layout it stopped and resumed
on (issue 29): same mesh (bitwise), another mesh, one process from a mesh checkpoint and a mesh
from a one-process checkpoint (within 1e-5), at every step after the resume; and a rank killed
while a checkpoint is written resumes from the previous one.

Before the fix, a sharded (mesh) resume left the optimizer's ``lr`` at the constructor's value
for the first step after the resume (only ``Optimizer.load_state_dict`` restores it, and DCP
restores the tensors only): step 9's loss matched, steps 10 onward did not.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moekit.models.sharded_checkpoint import is_sharded, read_state_dict
from tests.builders import TINY_MOE

pytestmark = pytest.mark.distributed

STEPS = 8
BATCH_2 = ["--set", "parallel.dp_shard=4", "--set", "data.batch_size=2"]
MESH = ["--set", "parallel.ep=2", *BATCH_2]
OTHER_MESH = ["--set", "parallel.ep=4", *BATCH_2]
ONE = ["--set", "data.batch_size=8"]


def _common(tiny_text: Path) -> list[str]:
    args = ["--quiet", "--set", f"data.path={tiny_text}"]
    # noisy gating, jitter and expert dropout: the model's random draws are part of what must
    # resume exactly, and be the same on any mesh
    extra = [
        f"steps={STEPS}",
        "checkpoint_every=4",
        "optim.grad_clip=0.5",
        "model.moe.layer.router.noisy_gating=true",
        "model.moe.layer.aux_loss.load=0.01",
        "model.moe.layer.router.jitter_eps=0.01",
        "model.moe.layer.experts.dropout=0.1",
    ]
    for item in [*TINY_MOE, *extra]:
        args += ["--set", item]
    return args


_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")


def _train(nproc: int, args: list[str], env: dict[str, str] | None = None) -> int:
    """``moekit train`` in fresh processes (one process too: nothing left in this process by
    other tests, such as a process group or launcher variables, can reach the run)."""
    clean = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    full_env = {**clean, "OMP_NUM_THREADS": "1", **(env or {})}
    if nproc == 1:
        cmd = [sys.executable, "-m", "moekit.cli.main", "train", *args]
        done = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-8000:]
        return 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", str(nproc), "--master-port", str(port)]
    cmd += ["-m", "moekit.cli.main", "train", *args]
    done = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=240)
    if env is None:
        assert done.returncode == 0, done.stderr[-8000:]
    return done.returncode


def _losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run / "checkpoints" / f"step_{step:07d}"
    if is_sharded(folder):
        return read_state_dict(folder)
    return load_file(str(folder / "model.safetensors"))


def _rewind(source: Path, target: Path, step: int) -> None:
    """``target``: a copy of ``source`` as if preempted right after the checkpoint ``step``."""
    shutil.copytree(source, target)
    for folder in (target / "checkpoints").glob("step_*"):
        if int(folder.name.split("_")[1]) > step:
            shutil.rmtree(folder)
    (target / "checkpoints" / "latest").write_text(f"step_{step:07d}\n")


def _assert_same_run(resumed: Path, reference: Path, *, exact: bool, after: int) -> None:
    got, want = _losses(resumed), _losses(reference)
    for step in range(after + 1, STEPS + 1):  # every step after the resume
        if exact:
            assert got[step] == want[step], f"step {step}: {got[step]} != {want[step]}"
        else:
            assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-5), f"step {step}"
    ours, theirs = _weights(resumed, STEPS), _weights(reference, STEPS)
    assert ours.keys() == theirs.keys()
    for name in ours:
        if exact:
            assert torch.equal(ours[name], theirs[name]), name
        else:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-5, msg=name)


def test_a_preempted_run_resumes_as_the_run_that_never_stopped(tmp_path, tiny_text):
    common = _common(tiny_text)
    mesh_run, one_run = tmp_path / "mesh", tmp_path / "one"
    _train(4, [*common, "--out-dir", str(mesh_run), *MESH])
    assert _train(1, [*common, "--out-dir", str(one_run), *ONE]) == 0
    for step in range(1, STEPS + 1):  # the two uninterrupted runs agree
        assert _losses(mesh_run)[step] == pytest.approx(_losses(one_run)[step], rel=1e-5)

    same = tmp_path / "same_mesh"  # preempted after step 4, resumed on the same mesh
    _rewind(mesh_run, same, 4)
    _train(4, [*common, "--out-dir", str(same), *MESH, "--resume"])
    _assert_same_run(same, mesh_run, exact=True, after=4)

    other = tmp_path / "other_mesh"  # resumed with ep=4 instead of 2
    _rewind(mesh_run, other, 4)
    _train(4, [*common, "--out-dir", str(other), *OTHER_MESH, "--resume"])
    _assert_same_run(other, mesh_run, exact=False, after=4)

    to_one = tmp_path / "mesh_to_one"  # a mesh checkpoint resumed in one process
    _rewind(mesh_run, to_one, 4)
    assert _train(1, [*common, "--out-dir", str(to_one), *ONE, "--resume"]) == 0
    _assert_same_run(to_one, mesh_run, exact=False, after=4)

    to_mesh = tmp_path / "one_to_mesh"  # a one-process checkpoint resumed on a mesh
    _rewind(one_run, to_mesh, 4)
    _train(4, [*common, "--out-dir", str(to_mesh), *MESH, "--resume"])
    _assert_same_run(to_mesh, one_run, exact=False, after=4)


def test_a_rank_killed_while_a_checkpoint_is_written_resumes_from_the_previous_one(
    tmp_path, tiny_text
):
    common = _common(tiny_text)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    _train(4, [*common, "--out-dir", str(reference), *MESH])
    code = _train(
        4,
        [*common, "--out-dir", str(killed), *MESH],
        env={"MOEKIT_KILL_DURING_SAVE": f"step_{STEPS:07d}"},
    )
    assert code != 0
    checkpoints = killed / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_0000004"
    assert not (checkpoints / f"step_{STEPS:07d}").exists()  # never published half-written
    _train(4, [*common, "--out-dir", str(killed), *MESH, "--resume"])
    assert not list(checkpoints.glob(".*saving*"))  # the stale staging folder was removed
    _assert_same_run(killed, reference, exact=True, after=4)


def test_four_ranks_with_micro_batches_train_as_one_process_with_one_batch(tmp_path, tiny_text):
    """4 ranks × batch 1 × 2 micro-batches, global-batch balancing, noisy gating: the same losses
    and parameters as one process with one batch of 8 (and as 4 × 2 in one process)."""
    common = _common(tiny_text)
    balance = ["switch_scope=global_batch", "load_scope=global_batch"]
    for item in balance:
        common += ["--set", f"model.moe.layer.aux_loss.{item}"]
    one, accum, mesh = tmp_path / "one", tmp_path / "accum", tmp_path / "mesh"
    assert _train(1, [*common, "--out-dir", str(one), *ONE]) == 0
    split = ["--set", "data.batch_size=4", "--set", "optim.grad_accum=2"]
    assert _train(1, [*common, "--out-dir", str(accum), *split]) == 0
    four = ["--set", "parallel.ep=2", "--set", "parallel.dp_shard=4"]
    four += ["--set", "data.batch_size=1", "--set", "optim.grad_accum=2"]
    _train(4, [*common, "--out-dir", str(mesh), *four])
    _assert_same_run(accum, one, exact=False, after=0)
    _assert_same_run(mesh, one, exact=False, after=0)


HYBRID_TOML = """
[model.token_mixers]
pattern = ["deltanet", "attention", "mamba", "conv"]
[model.token_mixers.mixers.deltanet]
kind = "gated_deltanet"
n_key_heads = 2
n_value_heads = 4
key_head_dim = 8
value_head_dim = 8
chunk = 16
[model.token_mixers.mixers.mamba]
kind = "mamba2"
n_heads = 4
head_dim = 8
state_dim = 8
chunk = 16
[model.token_mixers.mixers.conv]
kind = "short_conv"
"""


def test_a_hybrid_trains_on_the_mesh_as_in_one_process(tmp_path, tiny_text):
    """Issue 31: a hybrid of Gated DeltaNet, attention, Mamba2 and short convolutions on 4 ranks
    (expert parallel 2 × FSDP 4) logs the losses and weights of one process."""
    config = tmp_path / "hybrid.toml"
    config.write_text(HYBRID_TOML)
    common = [*_common(tiny_text), "--config", str(config), "--set", "model.n_layers=4"]
    mesh, one = tmp_path / "mesh", tmp_path / "one"
    _train(4, [*common, "--out-dir", str(mesh), *MESH])
    assert _train(1, [*common, "--out-dir", str(one), *ONE]) == 0
    _assert_same_run(mesh, one, exact=False, after=0)
    saved = json.loads((one / "checkpoints" / f"step_{STEPS:07d}" / "config.json").read_text())
    assert saved["config"]["token_mixers"]["pattern"] == ["deltanet", "attention", "mamba", "conv"]


GEMMA_JAMBA_TOML = """
[model]
norm_position = "sandwich"
layer_scalars = true
logit_softcap = 30.0
activation = "geglu_tanh"
[model.moe]
dense_beside = true
[model.moe.layer]
expert_scales = true
[model.token_mixers]
pattern = ["attention", "mamba", "global"]
[model.token_mixers.mixers.global]
kind = "attention"
n_heads = 4
n_kv_heads = 1
head_dim = 16
values = "keys"
qk_norm = "head"
[model.token_mixers.mixers.global.rope.scaling]
kind = "proportional"
factor = 1.0
original_max_position_embeddings = 64
rotated_fraction = 0.5
[model.token_mixers.mixers.mamba]
kind = "mamba"
state_dim = 8
chunk = 16
"""


def test_gemma_4_and_jamba_pieces_train_on_the_mesh_as_in_one_process(tmp_path, tiny_text):
    """Issue 31: Gemma 4's blocks (sandwich norms, layer scalars, a global attention block of
    its own shape, a dense FFN beside the MoE, expert scales) with Jamba's Mamba on 4 ranks
    (expert parallel 2 × FSDP 4) log the losses and weights of one process."""
    config = tmp_path / "gemma_jamba.toml"
    config.write_text(GEMMA_JAMBA_TOML)
    common = [*_common(tiny_text), "--config", str(config), "--set", "model.n_layers=3"]
    mesh, one = tmp_path / "mesh", tmp_path / "one"
    _train(4, [*common, "--out-dir", str(mesh), *MESH])
    assert _train(1, [*common, "--out-dir", str(one), *ONE]) == 0
    _assert_same_run(mesh, one, exact=False, after=0)
