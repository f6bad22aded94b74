"""Host syncs: a dropless top-k training step and a decode step (padding included) make no
device-to-host sync outside logging steps. Counted on the CPU with a TorchDispatchMode (the
ops that would sync on CUDA), with the CUDA-side choices switched on where moekit picks a
different path on the CPU (token range check, grouped weight gradient, fused AdamW)."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.experts import grouped_matmul
from moekit.models.common import block as lm_model
from moekit.training import loop
from moekit.training.config import load_train_config
from moekit.training.optim import build_optimizer, build_scheduler
from moekit.utils.syncs import HostSyncCounter
from tests.builders import TINY_MOE, tiny_lm


@pytest.fixture
def as_on_cuda(monkeypatch):
    """moekit's CUDA paths, run on the CPU."""
    monkeypatch.setattr(lm_model, "host_reads_are_free", lambda tensor: False)
    monkeypatch.setattr(grouped_matmul, "weight_grad_by_loop", lambda x: False)


def test_counter_sees_what_syncs():
    t = torch.arange(6.0)
    with HostSyncCounter() as counter:
        float(t.sum())
        t[t > 2]
        t.nonzero()
        t.tolist()
        torch.repeat_interleave(torch.tensor([1, 2]))
        # issue 32: the counter missed these three, which all wait for a CUDA device
        t.cpu()
        torch.bincount(torch.tensor([0, 2, 2]))
        u = t.clone()
        u[u > 3] = 0.0
        t * 2  # no sync
    assert counter.kinds == {
        "item": 1,
        "boolean-mask indexing": 1,
        "nonzero": 1,
        "tolist": 1,
        "repeat_interleave without output_size": 1,
        "torch.tensor from host values": 3,  # torch.tensor([0, 2, 2]) and the assigned 0.0
        "cpu": 1,
        "bincount": 1,
        "boolean-mask assignment": 1,
    }


def test_layer_with_statistics_makes_no_host_sync():
    import moekit

    layer = moekit.MoEConfig(num_experts=4, top_k=2, experts=moekit.ExpertConfig(hidden=16)).build(
        d_model=16
    )
    x = torch.randn(32, 16)
    layer(x)
    with HostSyncCounter() as counter:
        out = layer(x)
    assert out.stats is not None and counter.total == 0, counter.where


def _run(tmp_path, *overrides):
    config = load_train_config(
        None,
        [
            *TINY_MOE,
            f"out_dir={tmp_path}",
            "device=cpu",
            "steps=10",
            "log_every=5",
            "eval_every=10",
            *overrides,
        ],
    )
    run = loop._set_up(config, resume=False, stop_after=None)
    run.optimizer = build_optimizer(run.model, config.optim, fused=True)  # as on CUDA
    run.scheduler = build_scheduler(run.optimizer, config.steps, config.optim)
    run.model.train()
    return run


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("optim.grad_accum=2",),
        (
            "model.moe.layer.router.gating=sigmoid_topk",
            "model.moe.layer.router.bias_balancing=true",
        ),
    ],
)
def test_training_step_makes_no_host_sync(tmp_path, as_on_cuda, overrides):
    run = _run(tmp_path, *overrides)
    loop.train_step(run, 0)  # warm-up: lazy state
    with HostSyncCounter() as counter:
        output = loop.train_step(run, 1)
        loop.BiasUpdate().on_step_end(run, output)
    assert not output.writes_record
    assert counter.total == 0, counter.where
    # a record step reads the values (that is where syncs belong)
    with HostSyncCounter() as counter:
        output = loop.train_step(run, 4)
        loop.Metrics().on_step_end(run, output)
    assert output.writes_record and counter.total > 0


def test_expert_threshold_step_reads_only_the_variable_assignment_count(tmp_path, as_on_cuda):
    """Expert-Threshold routing's tally and threshold update are in-graph; its only read is the
    one every variable-k router makes (the number of assignments, to size the dispatch), once
    per MoE layer per forward (forward and the global-batch balancing pre-pass: none here)."""
    run = _run(tmp_path, "model.moe.layer.router.kind=expert_threshold")
    loop.train_step(run, 0)
    with HostSyncCounter() as counter:
        output = loop.train_step(run, 1)
        loop.BiasUpdate().on_step_end(run, output)
    layers = sum(1 for m in run.model.modules() if isinstance(m, moekit.MoE))
    assert set(counter.where) == {"item at dispatch/sort.py:111"}, counter.where
    assert counter.total == layers
    # a record step reads the values (that is where syncs belong)
    with HostSyncCounter() as counter:
        output = loop.train_step(run, 4)
        loop.Metrics().on_step_end(run, output)
    assert output.writes_record and counter.total > 0


def test_decode_step_with_padding_makes_no_host_sync(as_on_cuda):
    model = tiny_lm().eval()
    cache = model.new_kv_cache(2, 32)
    tokens = torch.randint(0, 40, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    with torch.no_grad():
        model(tokens, attention_mask=mask, kv_cache=cache)
        next_tokens = torch.randint(0, 40, (2, 1))
        with HostSyncCounter() as counter:
            model(next_tokens, kv_cache=cache)
            model(tokens[:, :2], attention_mask=torch.ones(2, 2, dtype=torch.bool), kv_cache=cache)
    assert counter.total == 0, counter.where


def test_padded_training_forward_makes_no_host_sync(as_on_cuda):
    model = tiny_lm().train()
    tokens = torch.randint(0, 40, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :5] = False
    model(tokens, attention_mask=mask)
    with HostSyncCounter() as counter:
        out = model(tokens, attention_mask=mask)
        (out.logits.sum() + out.aux_loss).backward()
    assert counter.total == 0, counter.where


def test_a_hybrid_trains_packed_and_decodes_without_host_syncs(as_on_cuda):
    """Gated DeltaNet, Mamba2 and short convolutions (issue 31): a packed training forward and
    backward, and a padded decode step, read nothing on the host."""
    from tests.models.test_hybrid import hybrid_config

    torch.manual_seed(0)
    model = hybrid_config().build().train()
    tokens = torch.randint(0, 64, (2, 12))
    segments = torch.tensor([[1] * 5 + [2] * 7, [3] * 12])
    model(tokens, segment_ids=segments)
    with HostSyncCounter() as counter:
        out = model(tokens, segment_ids=segments)
        (out.logits.sum() + out.aux_loss).backward()
    assert counter.total == 0, counter.where
    model.eval()
    cache = model.new_kv_cache(2, 32)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    with torch.no_grad():
        model(tokens[:, :6], attention_mask=mask, kv_cache=cache)
        with HostSyncCounter() as counter:
            model(tokens[:, 6:7], kv_cache=cache)
    assert counter.total == 0, counter.where


def test_cuda_token_range_check_is_an_async_assert(as_on_cuda):
    model = tiny_lm()
    with pytest.raises(RuntimeError, match="token ids must be in"):
        model(torch.tensor([[1, 99]]))


def test_the_loop_kernel_reads_the_group_sizes_once_per_layer_and_step():
    """Issue 32: the fp32 path (the loop of matmuls, where grouped_mm is not fast) read the
    group sizes six times per layer and step (two forward products, four backward); now once."""
    from moekit.experts.fused_ffn import expert_ffn

    counts = torch.tensor([3, 0, 2, 5])
    x = torch.randn(10, 8, requires_grad=True)
    w_in = torch.randn(4, 8, 12, requires_grad=True)
    w_out = torch.randn(4, 6, 8, requires_grad=True)
    with HostSyncCounter() as counter:
        y = expert_ffn(x, counts, w_in, w_out, kernel="loop")
        y.square().sum().backward()
    assert counter.kinds["tolist"] == 1, counter.where
    assert x.grad is not None and w_in.grad is not None and w_out.grad is not None
