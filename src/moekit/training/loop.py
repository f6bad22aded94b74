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
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from moekit.analysis.inspect import load_summary
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
    serving,
    update_expert_bias,
    update_expert_thresholds,
    update_null_offsets,
    without_statistics,
)
from moekit.models.checkpoint import read_config
from moekit.models.encoder_decoder.model import EncoderDecoderConfig, EncoderDecoderLM
from moekit.models.sharded_checkpoint import is_sharded
from moekit.models.transformer.model import TransformerConfig, TransformerLM
from moekit.training.checkpoint import (
    latest_checkpoint,
    load_training_checkpoint,
    read_trainer_state,
    refuse_to_overwrite,
    remove_stale_staging,
    restore_param_groups,
    rng_states,
    save_sharded_training_checkpoint,
    save_training_checkpoint,
)
from moekit.training.config import TrainConfig
from moekit.training.finetune import load_streams, prepare_model
from moekit.training.instruct import IGNORE_INDEX
from moekit.training.methods import (
    TrainingMethod,
    drop_gradients,
    frozen_groups,
    lm_parameter_groups,
)
from moekit.training.optim import build_optimizer, build_scheduler
from moekit.training.tokenizer_files import RUN_TOKENIZER_DIR, copy_tokenizer
from moekit.utils.allocator import retain_freed_memory
from moekit.utils.device import (
    autocast,
    resolve_device,
    set_matmul_precision,
    synchronize,
    use_bf16,
)
from moekit.utils.randomness import token_randomness
from moekit.utils.serialization import atomic_write_bytes, config_to_dict


@dataclass
class TrainResult:
    """What a run produced."""

    model: TransformerLM | EncoderDecoderLM
    out_dir: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    wall_time: float = 0.0
    train_time: float = 0.0
    tokens: int = 0
    search: Any = None  # method='evolutionary': the SearchResult of the router search
    trainable: list[tuple[str, int, int]] = field(default_factory=list)  # (group, trained, all)

    @property
    def evals(self) -> list[tuple[int, float]]:
        return [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]

    @property
    def final_val_loss(self) -> float:
        return self.evals[-1][1]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_time if self.train_time else 0.0


@torch.no_grad()
def _to_device(batch: tuple, device: torch.device) -> tuple:
    """``(x, y, segment_ids or None)`` on ``device`` from a 2- or 3-tuple batch."""
    x, y, *rest = batch
    segments = rest[0] if rest else None
    if device.type == "cuda":  # pinned host memory: the copies are truly asynchronous
        x, y = x.pin_memory(), y.pin_memory()
        segments = None if segments is None else segments.pin_memory()
    segments = None if segments is None else segments.to(device, non_blocking=True)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True), segments


def _token_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the targets that are not ``IGNORE_INDEX`` (a batch with
    none gives 0, not NaN)."""
    total = F.cross_entropy(
        logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if reduction == "sum":
        return total
    return total / (y != IGNORE_INDEX).sum().clamp(min=1)


def model_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, segments: torch.Tensor | None
) -> tuple[Any, torch.Tensor]:
    """``(output, mean cross-entropy)`` of one batch: next-token prediction for a decoder-only
    model; for an encoder–decoder, T5's prefix-LM split of the window
    (``EncoderDecoderLM.split_window``)."""
    split = getattr(model, "split_window", None)
    if split is None:
        out = model(x) if segments is None else model(x, segment_ids=segments)
        return out, _token_loss(out.logits, y)
    if segments is not None:
        raise ValueError(
            "packed instruction data (segment ids) trains decoder-only models; an encoder–decoder "
            "reads plain text windows"
        )
    source, decoder_tokens, targets = split(x, y)
    out = model(source, decoder_tokens=decoder_tokens)
    return out, _token_loss(out.logits, targets)


def evaluate(model: nn.Module, stream: Any, batches: int, batch_size: int, seq_len: int) -> float:
    """Mean next-token cross-entropy (nats) over fixed validation windows (over the response
    tokens only for instruction data)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    # no autograd graph, and no auxiliary losses or routing statistics: nothing reads them
    with torch.no_grad(), serving(model):
        for batch in stream.eval_batches(batches, batch_size, seq_len):
            x, y, segments = _to_device(batch, device)
            _, loss = model_loss(model, x, y, segments)
            split = getattr(model, "split_window", None)
            targets = y if split is None else split(x, y)[2]
            n = int((targets != IGNORE_INDEX).sum())
            total += loss.item() * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def _moe_record(outputs) -> list[dict[str, Any]]:
    records = []
    for o in outputs:
        record: dict[str, Any] = {
            "losses": {k: round(float(v.detach()), 6) for k, v in o.losses.items()}
        }
        if o.stats is not None:  # statistics may be off (MoEConfig.statistics)
            record["tokens_per_expert"] = o.stats.tokens_per_expert.tolist()
            record["load"] = load_summary(o.stats.tokens_per_expert)  # x ideal; dead experts
            record["dropped_fraction"] = round(float(o.stats.dropped_fraction), 6)
            record["router_entropy"] = round(float(o.stats.router_entropy), 6)
        records.append(record)
    return records


def _checkpoint(ctx, device, checkpoints, step, model, optimizer, scheduler, config_dict) -> None:
    """One process: the single-process layout (``model.safetensors``). On a mesh: a sharded
    checkpoint every rank writes its part of (it loads on any mesh, or in one process). Both
    hold every rank's generator states."""
    states = rng_states(ctx.rank, ctx.world, device)
    if not ctx.enabled:
        save_training_checkpoint(
            checkpoints, step, model, optimizer.state_dict(), scheduler, config_dict, states
        )
        return
    # every rank writes its own shards (DCP); nothing is gathered to one rank
    save_sharded_training_checkpoint(
        checkpoints, step, model, optimizer, scheduler, config_dict, states
    )


class _MetricsLog:
    """``metrics.jsonl`` (truncated to the resumed step) and, if installed, TensorBoard; only
    the main process writes."""

    def __init__(self, out_dir: Path, start_step: int, enabled: bool = True) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        kept = []
        if self.path.is_file():
            lines = self.path.read_text(errors="replace").splitlines()
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if number == len(lines):  # a line torn by a kill mid-write: drop it
                        break
                    raise ValueError(f"{self.path}:{number} is not valid JSON") from None
                if record.get("step", 0) <= start_step:
                    kept.append(record)
        self.records = kept
        if not enabled:
            return
        # rewritten atomically: a kill now leaves the old log or the new one, never half of it
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])
            for layer, moe in enumerate(record.get("moe", [])):
                for name, value in moe.get("load", {}).items():  # per-layer load percentiles
                    self.tensorboard.add_scalar(f"moe{layer}/load_{name}", value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


@dataclass
class TrainingRun:
    """What a run's step and callbacks share: the model, optimizer, data and where it writes."""

    config: TrainConfig
    model: TransformerLM | EncoderDecoderLM
    step_model: torch.nn.Module  # the model, or its data-parallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any
    groups: dict[str, list[torch.nn.Parameter]]
    ctx: Any  # moekit.distributed.runtime.DistributedContext
    device: torch.device
    train_stream: Any
    val_stream: Any
    out_dir: Path
    start_step: int
    last_step: int
    log: _MetricsLog
    result: TrainResult


@dataclass
class StepOutput:
    """One optimizer step. The losses and the gradient norm stay on the device (reading them
    is a host sync); callbacks read them on the steps that write a metrics line."""

    done: int  # steps completed, counting this one
    loss: torch.Tensor  # mean next-token cross-entropy over the micro-batches
    aux_loss: torch.Tensor
    grad_norm: torch.Tensor | None  # before clipping; None without clipping
    lr: float
    seconds: float  # this step's wall time (the device caught up on record steps)
    tokens: int  # tokens trained on in this step, over every rank
    moe_outputs: list[Any]
    writes_record: bool
    is_eval: bool
    record: dict[str, Any] = field(default_factory=dict)  # filled by the callbacks


class Callback:
    """A hook of the training loop: called after every optimizer step and at the end."""

    def on_step_end(self, run: TrainingRun, step: StepOutput) -> None:
        pass

    def on_train_end(self, run: TrainingRun) -> None:
        pass


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
        BiasUpdate(),
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
    batches = [_to_device(part, run.device) for part in _global_batch_parts(run, step)]

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
    with statistics, balance:
        for micro, (x, y, segments) in enumerate(batches):
            with keyed(micro):  # backward too: activation checkpointing recomputes the draws
                with autocast(run.device, use_bf16(config.bf16, run.device)):
                    out, ce = model_loss(run.step_model, x, y, segments)
                ((ce + out.aux_loss) / optim.grad_accum).backward()
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


class BiasUpdate(Callback):
    """The routers' state updates after each optimizer step: the auxiliary-loss-free bias of
    every bias-balancing router (DeepSeek-V3), the thresholds of every Expert-Threshold router
    and the zero-expert offsets steered to a target (tallies summed over the ranks first)."""

    def on_step_end(self, run: TrainingRun, step: StepOutput) -> None:
        update_expert_bias(run.model)
        update_expert_thresholds(run.model)
        update_null_offsets(run.model)


class Evaluation(Callback):
    """Validation loss every ``eval_every`` steps and at the end, into the step's record."""

    def on_step_end(self, run: TrainingRun, step: StepOutput) -> None:
        if step.is_eval:
            data = run.config.data
            step.record["val_loss"] = evaluate(
                run.model, run.val_stream, run.config.eval_batches, data.batch_size, data.seq_len
            )


class Metrics(Callback):
    """A metrics line (``metrics.jsonl``, TensorBoard, ``on_record``) on record steps; the only
    place the step's device values are read. Throughput is over the steps since the last line
    (the device catches up on record steps only)."""

    def __init__(self, on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.on_record = on_record
        self.window_seconds = 0.0
        self.window_tokens = 0

    def on_step_end(self, run: TrainingRun, step: StepOutput) -> None:
        self.window_seconds += step.seconds
        self.window_tokens += step.tokens
        if not step.writes_record:
            return
        loss = step.loss.item()
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} by step {step.done}")
        record: dict[str, Any] = {
            "step": step.done,
            "loss": loss,
            "aux_loss": step.aux_loss.item(),
            "lr": step.lr,
            "grad_norm": float("nan") if step.grad_norm is None else step.grad_norm.item(),
            "tokens_per_second": self.window_tokens / self.window_seconds,
            "moe": _moe_record(step.moe_outputs),
            "train_seconds": run.result.train_time,  # training steps so far (no evaluation)
        }
        self.window_seconds, self.window_tokens = 0.0, 0
        record.update(step.record)  # val_loss, and whatever earlier callbacks added
        step.record = record
        run.log.write(record)
        if self.on_record is not None:
            self.on_record(record)

    def on_train_end(self, run: TrainingRun) -> None:
        run.log.close()


def worst_load(record: dict[str, Any]) -> tuple[float, int] | None:
    """``(largest expert load × the equal share, most dead experts)`` over the record's MoE
    layers, or ``None`` without statistics."""
    loads = [m["load"] for m in record.get("moe", []) if "load" in m]
    if not loads:
        return None
    return max(load["max"] for load in loads), max(int(load["dead"]) for load in loads)


class RoutingHealth(Callback):
    """Warns once per layer when its routing collapses, on record steps: half or more of its
    experts dead (each below 1% of an equal share of the assignments). The record gets
    ``routing_collapse`` (the layers). Fine-tuning a Hub MoE without balancing ends there
    unnoticed otherwise. (A busiest-expert threshold was tried and left out: with top-k an
    expert chosen by every token is at ``E / k`` times the equal share, which tiny healthy
    models reach early.)"""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.warned: set[int] = set()

    def on_step_end(self, run: TrainingRun, step: StepOutput) -> None:
        if not step.writes_record:
            return
        collapsed = []
        for layer, moe in enumerate(step.record.get("moe", [])):
            counts, load = moe.get("tokens_per_expert"), moe.get("load")
            if not counts or load is None or len(counts) < 2:
                continue
            E = len(counts)
            if load["dead"] >= E / 2:
                collapsed.append(layer)
                if self.enabled and layer not in self.warned:
                    self.warned.add(layer)
                    print(
                        f"warning: routing in MoE layer {layer} collapsed by step {step.done}: "
                        f"{load['dead']} of {E} experts dead, the busiest at {load['max']:.1f}x "
                        "the equal share (threshold: half the experts below 1% of an equal "
                        "share); raise model.moe.layer.aux_loss.switch",
                        file=sys.stderr,
                        flush=True,
                    )
        if collapsed:
            step.record["routing_collapse"] = collapsed


class Progress(Callback):
    """A progress bar in a terminal; outside one (a file, CI) a plain line at each evaluation
    and at most every 30 seconds otherwise, instead of hundreds of bar redraws."""

    def __init__(self, total: int, initial: int, *, desc: str, enabled: bool) -> None:
        self.enabled, self.desc, self.total = enabled, desc, total
        self.interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            disable=not self.interactive,
            leave=False,
            dynamic_ncols=True,
        )
        self.last_line = time.monotonic()

    def on_step_end(self, run: TrainingRun, step: StepOutput) -> None:
        record = step.record if step.writes_record else {}
        if self.interactive:
            if record:
                val = {"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}
                worst = worst_load(record)
                if worst is not None:
                    val |= {"load": f"{worst[0]:.1f}x", "dead": str(worst[1])}
                self.bar.set_postfix(loss=f"{record['loss']:.3f}", **val)
            self.bar.update(1)
            return
        due = step.is_eval or time.monotonic() - self.last_line >= 30.0
        if self.enabled and record and due:
            self.last_line = time.monotonic()
            val_text = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
            worst = worst_load(record)
            load_text = "" if worst is None else f" load max {worst[0]:.2f}x dead {worst[1]}"
            print(
                f"{self.desc}: step {step.done}/{self.total} loss {record['loss']:.4f}"
                f"{val_text}{load_text}",
                file=sys.stderr,
                flush=True,
            )

    def on_train_end(self, run: TrainingRun) -> None:
        self.bar.close()


class Checkpointing(Callback):
    """A checkpoint every ``checkpoint_every`` steps and at the last step."""

    def on_step_end(self, run: TrainingRun, step: StepOutput) -> None:
        every = run.config.checkpoint_every
        if (every and step.done % every == 0) or step.done == run.last_step:
            _checkpoint(
                run.ctx,
                run.device,
                run.out_dir / "checkpoints",
                step.done,
                run.model,
                run.optimizer,
                run.scheduler,
                config_to_dict(run.config),
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
    torch.manual_seed(config.seed)
    model = config.model.build()
    resuming = resume and latest_checkpoint(Path(config.out_dir) / "checkpoints") is not None
    # fine-tuning: starting weights (a resumed run takes the checkpoint's), LoRA, preset
    trainable = prepare_model(model, config, train_stream, resuming=resuming)
    model.to(device)
    step_model: torch.nn.Module = model
    if ctx.meshes is not None:  # FSDP2 over the data × expert mesh
        # bf16 parameters and fp32 gradient reduction where the device computes in bf16
        bf16 = use_bf16(config.bf16, device)
        parallelize(model, ctx.meshes, param_dtype=torch.bfloat16 if bf16 else None)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.steps, config.optim)
    out_dir = Path(config.out_dir)
    checkpoints = out_dir / "checkpoints"
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
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # the run folder holds its own copy of the tokenizer: commands run from anywhere
        copy_tokenizer(config.data.tokenizer, out_dir / RUN_TOKENIZER_DIR)
    log = _MetricsLog(out_dir, start_step, enabled=ctx.is_main)
    result = TrainResult(model=model, out_dir=out_dir, records=log.records, trainable=trainable)
    return TrainingRun(
        config=config,
        model=model,
        step_model=step_model,
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
    )
