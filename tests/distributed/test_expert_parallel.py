"""Expert parallelism on 2 and 4 gloo processes against one process (marked ``distributed``)."""

import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from moekit.models import TransformerLM, from_pretrained, save_pretrained
from tests.distributed import workers

pytestmark = pytest.mark.distributed


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_workers_pass(fn, world: int, *args, timeout: float = 180.0) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` processes; fail (never hang) if any
    worker raises or the group has not finished within ``timeout`` seconds."""
    context = mp.start_processes(
        fn, args=(world, _port(), *args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{fn.__name__} on {world} processes did not finish in {timeout:.0f} s")


@pytest.mark.parametrize("world", [2, 4])
def test_layer_outputs_gradients_and_bias_match_one_process(world):
    _assert_workers_pass(workers.layer_equivalence, world, False)


@pytest.mark.parametrize("priority", ["probability", "position", "token"])
def test_capacity_drops_match_one_process(priority):
    _assert_workers_pass(workers.layer_equivalence, 2, False, priority)


def test_ranks_receiving_zero_tokens_do_not_hang():
    _assert_workers_pass(workers.layer_equivalence, 4, True)


@pytest.mark.parametrize("world", [2, 4])
def test_training_step_matches_one_process(world):
    _assert_workers_pass(workers.train_step_equivalence, world)


def test_checkpoints_reshard_between_ep_degrees(tmp_path):
    _assert_workers_pass(workers.save_checkpoint, 2, str(tmp_path / "ep2"))
    _assert_workers_pass(workers.load_checkpoint, 4, str(tmp_path / "ep2"))  # EP=2 -> EP=4
    _assert_workers_pass(workers.load_checkpoint, 1, str(tmp_path / "ep2"))  # EP=2 -> EP=1
    torch.manual_seed(0)
    save_pretrained(TransformerLM(workers._lm_config()), tmp_path / "ep1")
    _assert_workers_pass(workers.load_checkpoint, 2, str(tmp_path / "ep1"))  # EP=1 -> EP=2
    # the EP=2 checkpoint is the single-process one (same seed), tensor for tensor
    a, b = from_pretrained(tmp_path / "ep1"), from_pretrained(tmp_path / "ep2")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_bias_balancing_under_plain_ddp_follows_the_global_load():
    _assert_workers_pass(workers.ddp_bias_balancing, 2)


def test_train_frees_its_ddp_wrapper_while_the_group_is_alive(tmp_path, tiny_text):
    _assert_workers_pass(
        workers.train_frees_its_ddp_wrapper, 2, str(tiny_text), str(tmp_path / "run")
    )


@pytest.mark.parametrize(
    "parallel, experts, capacity",
    [
        (dict(ep=2, dp_shard=4), 4, False),  # EP2 × FSDP2 (efsdp 2)
        (dict(ep=4), 4, False),  # EP4, dense sharded over 4
        (dict(ep=1), 4, False),  # FSDP2 alone on 4 ranks
        (dict(ep=2), 2, False),  # E = 2 on 4 ranks
        (dict(ep=2, dp_shard=2, dp_replicate=2), 4, False),  # HSDP 2 × 2, EP2
        (dict(ep=2, dp_shard=4), 4, True),  # capacity decided over the global batch
    ],
    ids=["ep2-fsdp4", "ep4", "fsdp4", "e2-on-4", "hsdp2x2-ep2", "ep2-fsdp4-capacity"],
)
def test_mesh_training_matches_one_process(parallel, experts, capacity):
    _assert_workers_pass(workers.mesh_training_equivalence, 4, parallel, experts, capacity)
