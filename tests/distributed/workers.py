"""Code that runs inside spawned gloo processes (imported by the distributed tests)."""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import moekit
from moekit.distributed import meter_traffic
from moekit.distributed.ddp import (
    from_pretrained_distributed,
    full_state_dict,
    parallelize_experts,
    reduce_load_tallies,
    save_pretrained_distributed,
    wrap_data_parallel,
)
from moekit.models import TransformerConfig, TransformerLM, from_pretrained
from moekit.models.common.attention import AttentionConfig
from tests.builders import TINY_MOE, placement

D = 16


def init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def finish() -> None:
    """Leave together: no rank closes its connections while a peer still uses them."""
    dist.barrier()
    dist.destroy_process_group()


def _average_grads(model: torch.nn.Module, skip: set[str]) -> None:
    world = dist.get_world_size()
    for name, p in model.named_parameters():
        if name not in skip and p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def layer_equivalence(
    rank: int, world: int, port: int, zero_tokens: bool, priority: str | None = None
) -> None:
    init(rank, world, port)
    torch.manual_seed(0)
    dispatch = (
        moekit.DispatchConfig()
        if priority is None
        else moekit.DispatchConfig(
            mode="capacity", capacity_factor=0.6, min_capacity=1, drop_priority=priority
        )
    )
    ref = moekit.MoEConfig(
        num_experts=8,
        top_k=2,
        dispatch=dispatch,
        experts=moekit.ExpertConfig(hidden=12, bias=True),
        router=moekit.RouterConfig(bias_balancing=True),
        shared_experts=moekit.SharedExpertConfig(hidden=8),
        aux_loss=moekit.AuxLossConfig(switch=0.1, z_loss=0.01),
    ).build(d_model=D)
    if zero_tokens:  # every token picks experts 0 and 1: all other ranks receive nothing
        with torch.no_grad():
            ref.router.weight_ED.zero_()
            ref.router.weight_ED[:2] = 5.0
    x_global = torch.randn(world * 2, 5, D).abs()
    coeff = torch.randn(world * 2, 5, D)
    out_ref = ref(x_global)
    ((out_ref.output * coeff).sum(-1).mean() + out_ref.aux_loss).backward()

    ep = copy.deepcopy(ref)
    ep.zero_grad(set_to_none=True)
    parallelize_experts(ep)
    local = slice(rank * 2, rank * 2 + 2)
    with meter_traffic() as traffic:  # (x needs a gradient, so the dispatch sends one back)
        out = ep(x_global[local].clone().requires_grad_(True))
        ((out.output * coeff[local]).sum(-1).mean() + out.aux_loss).backward()
    if priority is None:  # the meter counts exactly the rows that cross ranks, 4 exchanges
        counts_RE = [torch.zeros(8, dtype=torch.long) for _ in range(world)]
        dist.all_gather(counts_RE, torch.bincount(out.routing.expert_idx_TK.flatten(), minlength=8))
        mine = slice(ep.dispatcher.first_expert, ep.dispatcher.first_expert + 8 // world)
        sent = int(counts_RE[rank].sum() - counts_RE[rank][mine].sum())
        received = sum(int(counts_RE[q][mine].sum()) for q in range(world) if q != rank)
        assert traffic.exchanges == 4
        assert traffic.bytes_sent == traffic.bytes_received == 2 * (sent + received) * D * 4
    expert_names = {f"experts.{n}" for n, _ in ep.experts.named_parameters()}
    _average_grads(ep, expert_names)  # what DDP does for the non-expert parameters

    torch.testing.assert_close(out.output, out_ref.output[local], rtol=1e-5, atol=1e-6)
    aux = out.aux_loss.detach().clone()
    dist.all_reduce(aux)
    torch.testing.assert_close(aux / world, out_ref.aux_loss.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.stats.tokens_per_expert, out_ref.stats.tokens_per_expert)
    assert torch.equal(out.stats.kept_per_expert, out_ref.stats.kept_per_expert)
    assert out.stats.capacity == out_ref.stats.capacity
    if priority is not None:
        assert out_ref.stats.kept_per_expert.sum() < out_ref.stats.tokens_per_expert.sum()
    grads_ref = dict(ref.named_parameters())
    first, local = ep.dispatcher.first_expert, ep.dispatcher.local_experts
    for name, p in ep.named_parameters():
        expected = grads_ref[name].grad
        if name in expert_names:
            expected = expected[first : first + local]
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6, msg=name)
    if zero_tokens and rank > 0:
        assert out.stats.kept_per_expert[first : first + local].sum() == 0
    # the bias-balancing tally is global, so the bias update is identical everywhere
    moekit.update_expert_bias(ep)
    moekit.update_expert_bias(ref)
    torch.testing.assert_close(ep.router.expert_bias_E, ref.router.expert_bias_E)
    finish()


def _lm_config() -> TransformerConfig:
    return TransformerConfig(
        vocab_size=40,
        d_model=D,
        n_layers=2,
        attention=AttentionConfig(n_heads=2),
        ffn_hidden=16,
        max_seq_len=16,
        moe=placement(
            D,
            num_experts=4,
            top_k=2,
            expert_hidden=8,
            router=moekit.RouterConfig(bias_balancing=True),
        ),
    )


def train_step_equivalence(rank: int, world: int, port: int) -> None:
    init(rank, world, port)
    torch.manual_seed(0)
    ref = TransformerLM(_lm_config())
    tokens = torch.randint(0, 40, (world * 2, 9))

    def step(model, batch):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        out = model(batch[:, :-1])
        ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
        (ce + out.aux_loss).backward()
        opt.step()
        moekit.update_expert_bias(model)
        return ce.detach(), out.aux_loss.detach()

    ep = wrap_data_parallel(parallelize_experts(copy.deepcopy(ref)))  # copied before any step
    ce_ref, aux_ref = step(ref, tokens)
    ce, aux = step(ep, tokens[rank * 2 : rank * 2 + 2])
    both = torch.stack([ce, aux])
    dist.all_reduce(both)
    torch.testing.assert_close(both / world, torch.stack([ce_ref, aux_ref]), rtol=1e-5, atol=1e-6)
    state = full_state_dict(ep)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # Drop DDP's reducer while the process group is alive: destroying the group first lets
    # gloo's worker thread wait for the GIL that the deallocating main thread holds.
    del ep
    gc.collect()
    finish()


def save_checkpoint(rank: int, world: int, port: int, directory: str) -> None:
    init(rank, world, port)
    torch.manual_seed(0)
    model = parallelize_experts(TransformerLM(_lm_config()))
    save_pretrained_distributed(model, directory)
    finish()


def load_checkpoint(rank: int, world: int, port: int, directory: str) -> None:
    init(rank, world, port)
    single = from_pretrained(directory).eval()
    ep = from_pretrained_distributed(directory).eval()
    tokens = torch.randint(0, 40, (3, 8), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        torch.testing.assert_close(ep(tokens).logits, single(tokens).logits, rtol=1e-5, atol=1e-5)
    finish()


def ddp_bias_balancing(rank: int, world: int, port: int) -> None:
    """Plain DDP (no expert parallelism): the bias follows the global load, as in one process."""
    init(rank, world, port)
    torch.manual_seed(0)
    config = moekit.MoEConfig(
        num_experts=4,
        top_k=1,
        experts=moekit.ExpertConfig(hidden=8),
        router=moekit.RouterConfig(bias_balancing=True, bias_update_rate=0.1),
    )
    ref = config.build(d_model=D)
    ddp_layer = copy.deepcopy(ref)
    wrapped = wrap_data_parallel(ddp_layer)
    # rank r sends its tokens to expert r only: each rank alone sees a very different load
    with torch.no_grad():
        ref.router.weight_ED.zero_()
        ddp_layer.router.weight_ED.zero_()
    per_rank = [torch.zeros(3 + 2 * r, D) for r in range(world)]
    for r, x in enumerate(per_rank):
        x[:, r] = 1.0
    with torch.no_grad():
        for e in range(4):
            ref.router.weight_ED[e, e] = 5.0
            ddp_layer.router.weight_ED[e, e] = 5.0
    for _ in range(3):
        ref(torch.cat(per_rank)).output.sum().backward()
        moekit.update_expert_bias(ref)
        wrapped(per_rank[rank]).output.sum().backward()
        assert reduce_load_tallies(wrapped) == 1
        moekit.update_expert_bias(ddp_layer)
    torch.testing.assert_close(ddp_layer.router.expert_bias_E, ref.router.expert_bias_E)
    assert ref.router.expert_bias_E.abs().sum() > 0
    del wrapped  # drop DDP's reducer while the group is alive (see train_step_equivalence)
    gc.collect()
    finish()


def train_frees_its_ddp_wrapper(rank: int, world: int, port: int, corpus: str, out: str) -> None:
    """``train`` under expert parallelism frees its DDP wrapper before it returns: DDP sits in
    reference cycles, and one the collector frees after the group is gone can abort the process
    at exit (gloo's worker thread waits for the GIL)."""
    from moekit.training.config import load_train_config
    from moekit.training.loop import train

    init(rank, world, port)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))  # as torchrun sets them
    gc.collect()
    gc.disable()  # only train's own collection may free the wrapper
    try:
        overrides = [*TINY_MOE, "steps=2", f"data.path={corpus}", f"out_dir={out}"]
        train(load_train_config(None, [*overrides, f"parallel.ep={world}"]), progress=False)
        alive = [o for o in gc.get_objects() if isinstance(o, DistributedDataParallel)]
        assert not alive, f"{len(alive)} DDP wrapper(s) outlive train()"
    finally:
        gc.enable()
    finish()


def _mesh_lm_config(num_experts: int, capacity: bool) -> TransformerConfig:
    dispatch = (
        moekit.DispatchConfig(
            mode="capacity", capacity_factor=0.75, min_capacity=1, drop_priority="token"
        )
        if capacity
        else moekit.DispatchConfig()
    )
    return TransformerConfig(
        vocab_size=40,
        d_model=D,
        n_layers=2,
        attention=AttentionConfig(n_heads=2),
        ffn_hidden=16,
        max_seq_len=16,
        moe=placement(
            D,
            num_experts=num_experts,
            top_k=2,
            expert_hidden=8,
            expert_bias=True,
            router=moekit.RouterConfig(bias_balancing=True),
            shared_experts=moekit.SharedExpertConfig(hidden=8),
            dispatch=dispatch,
            aux_loss=moekit.AuxLossConfig(switch=0.05, z_loss=0.01, importance=0.1),
        ),
    )


def mesh_training_equivalence(
    rank: int,
    world: int,
    port: int,
    parallel: dict,
    num_experts: int = 4,
    capacity: bool = False,
    steps: int = 3,
) -> None:
    """``steps`` optimizer steps (AdamW, global-norm clipping, bias balancing) on a data ×
    expert mesh with FSDP2 equal one process with the global batch: losses, gradient norms and
    every parameter (fp32)."""
    from moekit.distributed.mesh import (
        ParallelConfig,
        clip_grad_norm_,
        finish_expert_gradients,
        full_tensors,
        parallelize,
    )

    init(rank, world, port)
    torch.manual_seed(0)
    ref = TransformerLM(_mesh_lm_config(num_experts, capacity))
    dims = ParallelConfig(**parallel).resolve(world, num_experts)
    meshes = dims.build_meshes("cpu")
    model = parallelize(copy.deepcopy(ref), meshes)
    B = 2
    data = torch.randint(0, 40, (steps, world * B, 9), generator=torch.Generator().manual_seed(1))

    def step(module, batch, clip):
        out = module(batch[:, :-1])
        ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
        (ce + out.aux_loss).backward()
        norm = clip(module)
        return torch.stack([ce.detach(), out.aux_loss.detach()]), norm

    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for s in range(steps):
        losses_ref, norm_ref = step(
            ref, data[s], lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
        )

        def clip(m):
            finish_expert_gradients(m, meshes)
            return clip_grad_norm_(m, 0.5, meshes)

        losses, norm = step(model, data[s, rank * B : (rank + 1) * B], clip)
        for o, m in ((opt_ref, ref), (opt, model)):
            o.step()
            o.zero_grad(set_to_none=True)
            moekit.update_expert_bias(m)
        dist.all_reduce(losses)
        torch.testing.assert_close(losses / world, losses_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norm, norm_ref, rtol=1e-5, atol=1e-6)
    state = full_tensors(model, meshes)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-5, msg=name)
    # the bytes each rank holds, against moekit plan's estimate for this mesh
    from moekit.analysis.params import spec_from_moekit
    from moekit.analysis.plan import plan_expert_parallel

    held = torch.tensor(
        float(sum(p.to_local().numel() * p.element_size() for p in model.parameters()))
    )
    most = held.clone()
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    plan = plan_expert_parallel(
        spec_from_moekit(ref.config), dims.ep, 1, "fp32", dp_shard=dims.dp_shard
    )
    assert abs(float(most) - plan.weight_bytes) <= 0.05 * plan.weight_bytes, (most, plan)
    del model, opt
    gc.collect()
    finish()


def _mesh_model(parallel: dict, world: int, seed: int):
    from moekit.distributed.mesh import ParallelConfig, parallelize

    torch.manual_seed(seed)
    model = TransformerLM(_mesh_lm_config(4, False))
    meshes = ParallelConfig(**parallel).resolve(world, 4).build_meshes("cpu")
    return parallelize(model, meshes), meshes


def _fixed_tokens() -> torch.Tensor:
    return torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(7))


def mesh_save_sharded(rank: int, world: int, port: int, parallel: dict, folder: str) -> None:
    """Train one step on a mesh, write a sharded checkpoint, record the logits it gives."""
    from safetensors.torch import save_file

    from moekit.distributed.checkpoint import save_sharded
    from moekit.models.checkpoint import write_model_config

    init(rank, world, port)
    model, _ = _mesh_model(parallel, world, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(_fixed_tokens())
    (out.logits.square().mean() + out.aux_loss).backward()
    opt.step()
    save_sharded(folder, model, opt, write_rest=functools.partial(write_model_config, model))
    with torch.no_grad():
        logits = model(_fixed_tokens()).logits
    if rank == 0:
        save_file({"logits": logits.contiguous()}, folder + ".logits.safetensors")
    del model, opt
    gc.collect()
    finish()


def mesh_load_sharded(rank: int, world: int, port: int, parallel: dict, folder: str) -> None:
    """A differently initialised model on another mesh loads the checkpoint: same logits."""
    from safetensors.torch import load_file

    from moekit.distributed.checkpoint import load_sharded

    init(rank, world, port)
    model, meshes = _mesh_model(parallel, world, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_sharded(folder, model, opt, meshes)
    with torch.no_grad():
        logits = model(_fixed_tokens()).logits
    expected = load_file(folder + ".logits.safetensors")["logits"]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    del model, opt
    gc.collect()
    finish()


def mesh_global_batch_equivalence(rank: int, world: int, port: int, parallel: dict) -> None:
    """Global-batch balancing on a mesh: 2 micro-batches per rank on 4 ranks give the losses,
    the parameters after a step and the bias update of one process with one batch of all."""
    from moekit.distributed.mesh import (
        ParallelConfig,
        clip_grad_norm_,
        finish_expert_gradients,
        full_tensors,
        parallelize,
    )
    from moekit.layers import global_batch_balance

    init(rank, world, port)
    config = _mesh_lm_config(4, False)
    aux = moekit.AuxLossConfig(
        switch=0.1, switch_scope="global_batch", importance=0.2, importance_scope="global_batch"
    )
    config.moe.layer.aux_loss = aux  # type: ignore[union-attr]
    torch.manual_seed(0)
    ref = TransformerLM(config)
    meshes = ParallelConfig(**parallel).resolve(world, 4).build_meshes("cpu")
    model = parallelize(copy.deepcopy(ref), meshes)
    K, B = 2, 2
    data = torch.randint(0, 40, (K * world * B, 9), generator=torch.Generator().manual_seed(3))

    def run(module, batches, scale, clip):
        def forward(batch):
            out = module(batch[:, :-1])
            ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
            return ce, out.aux_loss

        total = torch.zeros(2)
        with global_batch_balance(module, lambda: [forward(b) for b in batches], scale=scale):
            for batch in batches:
                ce, aux_loss = forward(batch)
                ((ce + aux_loss) / len(batches)).backward()
                total += torch.stack([ce.detach(), aux_loss.detach()]) / len(batches)
        norm = clip(module)
        return total, norm

    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses_ref, norm_ref = run(
        ref, [data], 1, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
    )
    mine = [data[(k * world + rank) * B : (k * world + rank + 1) * B] for k in range(K)]

    def clip(m):
        finish_expert_gradients(m, meshes)
        return clip_grad_norm_(m, 0.5, meshes)

    losses, norm = run(model, mine, K * world, clip)
    for o, m in ((opt_ref, ref), (opt, model)):
        o.step()
        moekit.update_expert_bias(m)
    dist.all_reduce(losses)
    torch.testing.assert_close(losses / world, losses_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm, norm_ref, rtol=1e-5, atol=1e-6)
    state = full_tensors(model, meshes)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-5, msg=name)
    del model, opt
    gc.collect()
    finish()


def mesh_bf16_step(rank: int, world: int, port: int) -> None:
    """FSDP2's MixedPrecisionPolicy (bf16 parameters, fp32 reduction) on the mesh: a step under
    bf16 autocast keeps fp32 master weights and gradients and stays close to fp32."""
    from moekit.distributed.mesh import ParallelConfig, finish_expert_gradients, parallelize

    init(rank, world, port)
    torch.manual_seed(0)
    ref = TransformerLM(_mesh_lm_config(4, False))
    meshes = ParallelConfig(ep=2).resolve(world, 4).build_meshes("cpu")
    fp32 = parallelize(copy.deepcopy(ref), meshes)
    bf16 = parallelize(copy.deepcopy(ref), meshes, param_dtype=torch.bfloat16)
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(rank))
    losses = []
    for model, dtype in ((fp32, None), (bf16, torch.bfloat16)):
        context = (
            torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
        )
        with context:
            out = model(tokens[:, :-1])
            ce = torch.nn.functional.cross_entropy(
                out.logits.float().flatten(0, 1), tokens[:, 1:].flatten()
            )
        (ce + out.aux_loss).backward()
        finish_expert_gradients(model, meshes)
        losses.append(ce.detach())
    for p in bf16.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
    assert torch.isfinite(losses[1]) and abs(float(losses[1] - losses[0])) < 0.05
    del fp32, bf16
    gc.collect()
    finish()


def router_state_over_ranks(rank: int, world: int, port: int) -> None:
    """Expert-Threshold cuts and null-expert tallies are summed over the ranks before their
    update: every rank ends with the state one process gets from the tallies of all ranks."""
    from moekit.experts.bank import ExpertConfig
    from moekit.experts.zero_computation import ZeroComputationConfig
    from moekit.layers import MoEConfig, update_expert_thresholds, update_null_offsets
    from moekit.routing import ExpertThresholdRouterConfig

    init(rank, world, port)
    try:
        torch.manual_seed(0)  # the same router on every rank
        threshold = ExpertThresholdRouterConfig(capacity_factor=1.0).build(
            d_model=8, num_experts=4, top_k=1
        )
        null_layer = MoEConfig(
            num_experts=4,
            top_k=2,
            experts=ExpertConfig(hidden=6),
            zero_computation=ZeroComputationConfig(zero=4, target_experts_per_token=1.0),
        ).build(d_model=8)
        inputs = [
            torch.randn(12, 8, generator=torch.Generator().manual_seed(r)) for r in range(world)
        ]
        with torch.no_grad():  # what all ranks route to real experts, before any update
            real = sum(float((null_layer.router(x).expert_idx_TK < 4).sum()) for x in inputs) / (
                12 * world
            )
        threshold.train()(inputs[rank])  # each rank tallies its own tokens
        null_layer.train()(inputs[rank])
        assert update_expert_thresholds(threshold) == 1
        assert update_null_offsets(null_layer) == 1
        # one process, all ranks' calls tallied
        torch.manual_seed(0)
        alone = ExpertThresholdRouterConfig(capacity_factor=1.0).build(
            d_model=8, num_experts=4, top_k=1
        )
        alone.train()
        for x in inputs:
            alone(x)
        alone.update_thresholds()
        torch.testing.assert_close(threshold.threshold_E, alone.threshold_E)
        expected = 1e-3 * (1.0 if real > 1.0 else -1.0 if real < 1.0 else 0.0)
        assert abs(float(null_layer.router.null_slots.offset) - expected) < 1e-9
        gathered = [torch.zeros(4) for _ in range(world)]
        dist.all_gather(gathered, threshold.threshold_E)
        assert all(torch.equal(g, gathered[0]) for g in gathered)
    finally:
        finish()
