"""One readable training loop for the MoE language model.

Per optimizer step: ``grad_accum`` micro-batches of cross-entropy plus the model's weighted MoE
auxiliary losses, gradient clipping, AdamW, the schedule, then the auxiliary-loss-free bias
update of every bias-balancing router (DeepSeek-V3). Metrics go to ``metrics.jsonl`` (and to
TensorBoard when it is installed); validation every ``eval_every`` steps; checkpoints every
``checkpoint_every`` steps and at the end. ``resume=True`` continues from the latest checkpoint
and gives the same losses as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist

from moekit.distributed.checkpoint import load_sharded
from moekit.distributed.mesh import (
    clip_grad_norm_,
    finish_expert_gradients,
    load_full_optimizer_state,
    load_full_state_dict,
    parallelize,
)
from moekit.distributed.runtime import setup_distributed
from moekit.layers.switches import (
    global_batch_balance,
    without_statistics,
)
from moekit.models.checkpoint import read_config
from moekit.models.common.compile import compile_dense_parts
from moekit.models.encoder_decoder.model import EncoderDecoderConfig
from moekit.models.sharded_checkpoint import is_sharded
from moekit.models.transformer.model import TransformerConfig
from moekit.training.callbacks import (
    BiasUpdate,
    Callback,
    Checkpointing,
    Evaluation,
    Metrics,
    Progress,
    RouterStateUpdate,
    RoutingHealth,
    worst_load,
)
from moekit.training.checkpoint import (
    align_optimizer_state,
    latest_checkpoint,
    load_training_checkpoint,
    parameter_names,
    read_trainer_state,
    refuse_to_overwrite,
    remove_stale_staging,
    restore_param_groups,
)
from moekit.training.config import TrainConfig
from moekit.training.finetune import load_streams, prepare_model
from moekit.training.methods import (
    TrainingMethod,
    drop_gradients,
    frozen_groups,
    lm_parameter_groups,
)
from moekit.training.objective import evaluate, model_loss, to_device
from moekit.training.optim import build_optimizer, build_scheduler
from moekit.training.run import MetricsLog, StepOutput, TrainingRun, TrainResult
from moekit.training.tokenizer_files import RUN_TOKENIZER_DIR, copy_tokenizer
from moekit.training.working_weights import WorkingWeights
from moekit.utils.allocator import retain_freed_memory
from moekit.utils.device import (
    autocast,
    resolve_device,
    set_matmul_precision,
    synchronize,
    use_bf16,
)
from moekit.utils.randomness import token_randomness

# the loop's public names (the callbacks, run types and objective live in their own modules;
# these names keep working from here)
__all__ = [
    "BiasUpdate",
    "Callback",
    "Checkpointing",
    "Evaluation",
    "Metrics",
    "Progress",
    "RouterStateUpdate",
    "RoutingHealth",
    "StepOutput",
    "TrainResult",
    "TrainingRun",
    "evaluate",
    "micro_batch_row_offset",
    "model_loss",
    "train",
    "train_step",
    "worst_load",
]


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
    on_record: Callable[[dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
    callbacks: list[Callback] | None = None,
) -> TrainResult:
    """Train ``config.model`` on ``config.data``.

    Args:
        config: the run.
        resume: continue from ``<out_dir>/checkpoints/latest`` if it exists.
        progress: show progress (a bar in a terminal, plain lines otherwise).
        desc: progress label.
        on_record: called with every metrics record (callbacks, live plots).
        stop_after: stop after this many steps in total (simulates an interrupted run).
        callbacks: more hooks, called after the built-in ones (bias update, evaluation,
            metrics, progress, checkpointing) at every step.
    """
    if config.method is TrainingMethod.EVOLUTIONARY:
        raise ValueError(
            "method='evolutionary' searches router configurations, training each candidate "
            "with train(): run it with moekit.training.train_evolved(config) (what `moekit "
            "train` does)"
        )
    start_time = time.perf_counter()
    run = _set_up(config, resume=resume, stop_after=stop_after)
    hooks: list[Callback] = [
        RouterStateUpdate(),
        Evaluation(),
        Metrics(on_record),
        RoutingHealth(enabled=run.ctx.rank == 0),
        Progress(config.steps, run.start_step, desc=desc, enabled=progress),
        Checkpointing(),
        *(callbacks or []),
    ]
    run.model.train()
    for step in range(run.start_step, run.last_step):
        output = train_step(run, step)
        for hook in hooks:
            hook.on_step_end(run, output)
    for hook in hooks:
        hook.on_train_end(run)
    if run.step_model is not run.model:
        # DDP's reducer sits in reference cycles: free it now, while the process group is
        # alive (freed later by the collector, gloo's worker thread can wait for the GIL that
        # the deallocating thread holds, and the process aborts)
        run.step_model = run.model
        gc.collect()
    run.result.wall_time = time.perf_counter() - start_time
    return run.result


def _global_batch_parts(run: TrainingRun, step: int) -> list[tuple]:
    """This rank's micro-batches of optimizer step ``step``.

    The step's global batch is one draw from the stream (a function of the seed and the step
    only) of ``batch_size × data-parallel ranks × grad_accum`` rows; micro-batch ``m`` of rank
    ``r`` holds rows ``(m · ranks + r) · batch_size`` onward. The data a step trains on is
    therefore the same whatever its split into ranks and micro-batches, and a run resumed on
    another mesh or with another split continues the same stream."""
    data, ctx, accum = run.config.data, run.ctx, run.config.optim.grad_accum
    batch = run.train_stream.batch(
        step, data.batch_size * ctx.world * accum, data.seq_len, run.config.seed
    )
    if ctx.world == 1 and accum == 1:
        return [batch]
    parts = []
    for micro in range(accum):
        first = (micro * ctx.world + ctx.rank) * data.batch_size
        parts.append(tuple(t[first : first + data.batch_size] for t in batch))
    return parts


def micro_batch_row_offset(run: TrainingRun, micro: int) -> int:
    """Index of the first row of this rank's micro-batch ``micro`` in the step's global batch
    (the layout of :func:`_global_batch_parts`)."""
    return (micro * run.ctx.world + run.ctx.rank) * run.config.data.batch_size


def train_step(run: TrainingRun, step: int) -> StepOutput:
    """One optimizer step (0-based ``step``): ``grad_accum`` micro-batches of cross-entropy plus
    auxiliary losses, the frozen groups of the training method, clipping, AdamW, the schedule.
    No host sync except on steps that write a metrics line."""
    config, optim, data = run.config, run.config.optim, run.config.data
    step_start = time.perf_counter()
    done = step + 1
    is_eval = done % config.eval_every == 0 or done == config.steps
    writes_record = done % config.log_every == 0 or is_eval or done == run.last_step
    loss = torch.zeros((), device=run.device)
    aux = torch.zeros((), device=run.device)
    batches = [to_device(part, run.device) for part in _global_batch_parts(run, step)]

    def keyed(micro: int):  # the model's random draws: a function of step and token place
        return token_randomness(
            run.model,
            seed=config.seed,
            step=step,
            row_offset=micro_batch_row_offset(run, micro),
            rows=data.batch_size,
        )

    def forward_only() -> None:  # global-batch balancing's routing pre-pass
        for micro, (x, y, segments) in enumerate(batches):
            with keyed(micro), autocast(run.device, use_bf16(config.bf16, run.device)):
                model_loss(run.step_model, x, y, segments)

    balance = global_batch_balance(
        run.model,
        forward_only,
        scale=optim.grad_accum * run.ctx.world,
        devices=[run.device] if run.device.type == "cuda" else None,
    )
    # routing statistics feed only the metrics line: skip their work on the other steps
    statistics = contextlib.nullcontext() if writes_record else without_statistics(run.model)
    weights = run.working_weights
    with weights.swapped() if weights else contextlib.nullcontext(), statistics, balance:
        for micro, (x, y, segments) in enumerate(batches):
            with keyed(micro):  # backward too: activation checkpointing recomputes the draws
                with autocast(run.device, use_bf16(config.bf16, run.device)):
                    out, ce = model_loss(run.step_model, x, y, segments)
                ((ce + out.aux_loss) / optim.grad_accum).backward()
            if weights:
                weights.move_gradients()
            loss += ce.detach() / optim.grad_accum
            aux += out.aux_loss.detach() / optim.grad_accum
    for group in frozen_groups(
        config.method,
        step,
        schedule=config.alternating,
        separate_expert_steps=config.separate_expert_steps or config.steps // 2,
    ):
        drop_gradients(run.groups[group])  # frozen this step: no update, no optimizer state
    meshes = run.ctx.meshes
    if meshes is not None:
        finish_expert_gradients(run.model, meshes)
    if optim.grad_clip <= 0:
        grad_norm = None
    elif meshes is None:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), optim.grad_clip)
    else:  # one norm over the dense and the expert shards
        grad_norm = clip_grad_norm_(run.model, optim.grad_clip, meshes)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    if weights:
        weights.refresh()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if writes_record and run.ctx.enabled:  # the global batch's losses, as one process logs
        losses = torch.stack([loss, aux])
        dist.all_reduce(losses)
        loss, aux = losses / run.ctx.world
    if writes_record:
        synchronize(run.device)  # the step's time includes the device's work
    seconds = time.perf_counter() - step_start
    run.result.train_time += seconds
    tokens = optim.grad_accum * data.batch_size * data.seq_len * run.ctx.world
    run.result.tokens += tokens
    return StepOutput(
        done=done,
        loss=loss,
        aux_loss=aux,
        grad_norm=grad_norm,
        lr=lr,
        seconds=seconds,
        tokens=tokens,
        moe_outputs=out.moe_outputs,
        writes_record=writes_record,
        is_eval=is_eval,
    )


def _set_up(config: TrainConfig, *, resume: bool, stop_after: int | None) -> TrainingRun:
    """Device, process group, data, model (fine-tuning preparation, parallelism), optimizer,
    schedule and, when resuming, their state from the latest checkpoint."""
    if config.retain_freed_memory:
        retain_freed_memory()
    device = resolve_device(config.device)
    set_matmul_precision(device, config.tf32)
    seq2seq = isinstance(config.model, EncoderDecoderConfig)
    num_experts = 0 if seq2seq else cast(TransformerConfig, config.model).moe.num_experts
    ctx = setup_distributed(config.parallel, device, num_experts=num_experts)
    if seq2seq and ctx.enabled:
        raise ValueError(
            "encoder–decoder models train in one process for now (torchrun with a mesh trains "
            "the decoder-only TransformerLM)"
        )
    train_stream, val_stream = load_streams(config)  # fails before any model is built
    model, trainable = _build_model(config, ctx, device, train_stream, resume)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.steps, config.optim)
    out_dir = Path(config.out_dir)
    start_step = _restore(config, ctx, device, model, optimizer, scheduler, resume)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # the run folder holds its own copy of the tokenizer: commands run from anywhere
        copy_tokenizer(config.data.tokenizer, out_dir / RUN_TOKENIZER_DIR)
    log = MetricsLog(out_dir, start_step, enabled=ctx.is_main)
    result = TrainResult(model=model, out_dir=out_dir, records=log.records, trainable=trainable)
    return TrainingRun(
        config=config,
        model=model,
        step_model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        groups=lm_parameter_groups(model),
        ctx=ctx,
        device=device,
        train_stream=train_stream,
        val_stream=val_stream,
        out_dir=out_dir,
        start_step=start_step,
        last_step=config.steps if stop_after is None else min(config.steps, stop_after),
        log=log,
        result=result,
        working_weights=_working_weights(config, ctx, device, model),
    )


def _working_weights(
    config: TrainConfig, ctx: Any, device: torch.device, model: torch.nn.Module
) -> WorkingWeights | None:
    """bf16 working copies of the matrix weights (built after a resume loaded the masters)
    when ``config.working_weights`` asks for them: ``auto`` wherever the step runs under bf16
    autocast in one process (under a mesh FSDP2's ``param_dtype`` keeps bf16 working
    parameters already)."""
    bf16 = use_bf16(config.bf16, device)
    if config.working_weights == "bf16" and not bf16:
        raise ValueError(
            f"working_weights='bf16' computes with bf16 copies under bf16 autocast, but bf16 is "
            f"off on {device} (bf16={config.bf16!r}): set bf16=true or working_weights='auto'"
        )
    if config.working_weights == "fp32" or not bf16 or ctx.meshes is not None:
        return None
    weights = WorkingWeights(model)
    return weights if len(weights) else None


def _build_model(
    config: TrainConfig, ctx: Any, device: torch.device, train_stream: Any, resume: bool
) -> tuple[Any, list[tuple[str, int, int]]]:
    """The seeded model, prepared for fine-tuning (starting weights, LoRA, preset: a resumed
    run takes the checkpoint's weights instead), on ``device``, sharded over the mesh (FSDP2)
    when there is one; with the trainable-parameter summary."""
    torch.manual_seed(config.seed)
    model = config.model.build()
    resuming = resume and latest_checkpoint(Path(config.out_dir) / "checkpoints") is not None
    trainable = prepare_model(model, config, train_stream, resuming=resuming)
    model.to(device)
    if config.compile == "dense":  # before sharding, as torchtitan orders them
        compile_dense_parts(model)
    if ctx.meshes is not None:  # FSDP2 over the data × expert mesh
        # bf16 parameters and fp32 gradient reduction where the device computes in bf16
        bf16 = use_bf16(config.bf16, device)
        parallelize(model, ctx.meshes, param_dtype=torch.bfloat16 if bf16 else None)
    return model, trainable


def _restore(
    config: TrainConfig,
    ctx: Any,
    device: torch.device,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    resume: bool,
) -> int:
    """Resume: the latest checkpoint's model, optimizer and schedule (a sharded one resharded
    onto this mesh, a single-process one on any layout); returns the step to start from. A
    fresh run refuses a folder that holds checkpoints."""
    checkpoints = Path(config.out_dir) / "checkpoints"
    start_step = 0
    if ctx.is_main:
        remove_stale_staging(checkpoints)  # left by a run killed while saving
    if resume and (folder := latest_checkpoint(checkpoints)) is not None and is_sharded(folder):
        _, saved_config = read_config(folder)
        if saved_config != config.model:
            raise ValueError(f"{folder} holds a different model config than this run's")
        load_sharded(folder, model, optimizer, ctx.meshes)  # resharded onto this mesh
        trainer_state = read_trainer_state(folder, rank=ctx.rank, device=device)
        restore_param_groups(optimizer, trainer_state["optimizer"]["param_groups"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        start_step = trainer_state["step"]
    elif resume and folder is not None:
        model_state, optimizer_state, trainer_state = load_training_checkpoint(
            folder, config.model, rank=ctx.rank, device=device
        )
        optimizer_state = align_optimizer_state(optimizer_state, parameter_names(model, optimizer))
        if ctx.meshes is None:
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optimizer_state)
        else:
            load_full_state_dict(model, model_state)
            load_full_optimizer_state(model, optimizer, optimizer_state)
        scheduler.load_state_dict(trainer_state["scheduler"])
        start_step = trainer_state["step"]
    elif not resume:
        refuse_to_overwrite(checkpoints)
    if ctx.enabled:
        dist.barrier()  # every rank has read the checkpoint before rank 0 may write one
    return start_step
