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


def test_threshold_and_null_expert_tallies_are_summed_over_the_ranks():
    _assert_workers_pass(workers.router_state_over_ranks, 2)


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


def test_sharded_checkpoints_reshard_between_meshes_and_consolidate(tmp_path):
    """EP2×DP2 writes (every rank its part) -> EP4 reads -> one process reads -> consolidated
    model.safetensors -> EP2×DP2 reads: the same logits everywhere."""
    import shutil

    from safetensors.torch import load_file

    from moekit.models.sharded_checkpoint import consolidate

    folder = str(tmp_path / "ckpt")
    ep2 = dict(ep=2, dp_shard=2, dp_replicate=2)
    _assert_workers_pass(workers.mesh_save_sharded, 4, ep2, folder)
    assert not list(tmp_path.glob(".ckpt.saving*"))  # published, staging gone
    _assert_workers_pass(workers.mesh_load_sharded, 4, dict(ep=4), folder)
    one = from_pretrained(folder).eval()
    expected = load_file(folder + ".logits.safetensors")["logits"]
    with torch.no_grad():
        torch.testing.assert_close(
            one(workers._fixed_tokens()).logits, expected, rtol=1e-5, atol=1e-5
        )
    single = tmp_path / "single"
    shutil.copytree(folder, single, ignore=shutil.ignore_patterns("sharded"))
    consolidate(folder, single / "model.safetensors")
    assert set(load_file(str(single / "model.safetensors"))) == set(one.state_dict())
    with torch.no_grad():
        reloaded = from_pretrained(single, verify=False).eval()
        torch.testing.assert_close(
            reloaded(workers._fixed_tokens()).logits, expected, rtol=1e-5, atol=1e-5
        )
    _assert_workers_pass(workers.mesh_load_sharded, 4, ep2, folder)


def test_global_batch_balancing_on_a_mesh_matches_one_batch():
    _assert_workers_pass(workers.mesh_global_batch_equivalence, 4, dict(ep=2, dp_shard=4))


def test_bf16_mixed_precision_policy_on_the_mesh():
    _assert_workers_pass(workers.mesh_bf16_step, 4)
