"""Generator states in checkpoints (per rank, CPU and CUDA) and progress output that suits
where it goes."""

from __future__ import annotations

import torch

from moekit.training.checkpoint import restore_rng_states, rng_states, rng_states_of_rank
from moekit.training.config import load_train_config
from moekit.training.loop import train
from moekit.utils.device import use_bf16
from tests.builders import TINY_MOE


def test_each_rank_restores_its_own_generator_state():
    torch.manual_seed(1)
    rank0 = rng_states_of_rank(0, None)
    torch.manual_seed(2)
    rank1 = rng_states_of_rank(1, None)
    states = {**rank0, **rank1}
    assert set(states) == {"rng.torch", "rng.torch.rank0", "rng.torch.rank1"}
    restore_rng_states(states, 1, None)
    after_rank1 = torch.rand(3)
    torch.manual_seed(2)
    assert torch.equal(after_rank1, torch.rand(3))
    restore_rng_states(states, 0, None)
    after_rank0 = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(after_rank0, torch.rand(3))
    # a rank the checkpoint did not have (the world grew) starts from rank 0's CPU state
    restore_rng_states(states, 5, None)
    torch.manual_seed(1)
    expected = torch.rand(3)
    restore_rng_states(states, 5, None)
    assert torch.equal(torch.rand(3), expected)


def test_single_process_states_need_no_collective():
    assert set(rng_states(0, 1, torch.device("cpu"))) == {"rng.torch", "rng.torch.rank0"}


def test_bf16_auto_is_off_on_the_cpu():
    assert use_bf16("auto", torch.device("cpu")) is False
    assert use_bf16(True, torch.device("cpu")) is True
    assert load_train_config(None, []).bf16 == "auto"


def test_progress_outside_a_terminal_is_a_few_plain_lines(tmp_path, capsys):
    config = load_train_config(
        None, [*TINY_MOE, "steps=12", "eval_every=6", "log_every=1", f"out_dir={tmp_path}"]
    )
    train(config, progress=True)
    err = capsys.readouterr().err
    # routing warnings (this tiny model's layers do collapse) are not progress lines
    lines = [line for line in err.splitlines() if line.strip() and "warning:" not in line]
    # one line per evaluation (steps 6 and 12) and no progress-bar redraws
    assert lines == [line for line in lines if line.startswith("train: step ")]
    assert [line.split()[2] for line in lines] == ["6/12", "12/12"]
    assert "\r" not in err
