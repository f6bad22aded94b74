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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from moekit.analysis.inspect import load_summary
from moekit.classic.methods import TrainingMethod, drop_gradients
from moekit.distributed.parallelize import (
    full_optimizer_state,
    full_state_dict,
    load_full_state_dict,
    parallelize_experts,
    reduce_load_tallies,
    shard_optimizer_state,
    wrap_data_parallel,
)
from moekit.distributed.runtime import setup_distributed
from moekit.layers import serving, without_statistics
from moekit.models.transformer.model import TransformerLM
from moekit.routing.bias_balancing import update_expert_bias
from moekit.training.checkpoint import (
    latest_checkpoint,
    load_training_checkpoint,
    refuse_to_overwrite,
    remove_stale_staging,
    save_training_checkpoint,
)
from moekit.training.config import TrainConfig
from moekit.training.finetune import load_streams, prepare_model
from moekit.training.instruct import IGNORE_INDEX
from moekit.training.methods import frozen_groups, lm_parameter_groups
from moekit.training.optim import build_optimizer, build_scheduler
from moekit.utils.allocator import retain_freed_memory
from moekit.utils.device import autocast, resolve_device
from moekit.utils.serialization import atomic_write_bytes, config_to_dict


@dataclass
class TrainResult:
    """What a run produced."""

    model: TransformerLM
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
    segments = rest[0].to(device, non_blocking=True) if rest else None
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


def evaluate(
    model: TransformerLM, stream: Any, batches: int, batch_size: int, seq_len: int
) -> float:
    """Mean next-token cross-entropy (nats) over fixed validation windows (over the response
    tokens only for instruction data)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = model.embed.weight.device
    # no autograd graph, and no auxiliary losses or routing statistics: nothing reads them
    with torch.no_grad(), serving(model):
        for batch in stream.eval_batches(batches, batch_size, seq_len):
            x, y, segments = _to_device(batch, device)
            logits = (model(x) if segments is None else model(x, segment_ids=segments)).logits
            total += _token_loss(logits, y, reduction="sum").item()
            count += int((y != IGNORE_INDEX).sum())
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


def _checkpoint(ctx, checkpoints, step, model, optimizer, scheduler, config_dict) -> None:
    """Save in the single-process layout: gathered under expert parallelism, written by rank 0."""
    if not ctx.enabled:
        save_training_checkpoint(
            checkpoints, step, model, optimizer.state_dict(), scheduler, config_dict
        )
        return
    model_state = full_state_dict(model)
    optimizer_state = full_optimizer_state(model, optimizer)
    if ctx.is_main:
        full = TransformerLM(model.config)
        full.load_state_dict(model_state)
        save_training_checkpoint(checkpoints, step, full, optimizer_state, scheduler, config_dict)
    dist.barrier()


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


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
    on_record: Callable[[dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``config.model`` on ``config.data``.

    Args:
        config: the run.
        resume: continue from ``<out_dir>/checkpoints/latest`` if it exists.
        progress: show a progress bar.
        desc: progress-bar label.
        on_record: called with every metrics record (callbacks, live plots).
        stop_after: stop after this many steps in total (simulates an interrupted run).
    """
    if config.method is TrainingMethod.EVOLUTIONARY:
        from moekit.training.evolution import train_evolved

        return train_evolved(config, resume=resume, progress=progress, desc=desc)
    start_time = time.perf_counter()
    if config.retain_freed_memory:
        retain_freed_memory()
    device = resolve_device(config.device)
    ctx = setup_distributed(config.expert_parallel, device)
    train_stream, val_stream = load_streams(config)  # fails before any model is built
    torch.manual_seed(config.seed)
    model = TransformerLM(config.model)
    resuming = resume and latest_checkpoint(Path(config.out_dir) / "checkpoints") is not None
    # fine-tuning: starting weights (a resumed run takes the checkpoint's), LoRA, preset
    trainable = prepare_model(model, config, train_stream, resuming=resuming)
    model.to(device)
    step_model: torch.nn.Module = model
    if ctx.enabled:
        if ctx.expert_parallel:
            parallelize_experts(model)
        step_model = wrap_data_parallel(model)
    optimizer = build_optimizer(model, config.optim)
    groups = lm_parameter_groups(model)
    scheduler = build_scheduler(optimizer, config.steps, config.optim)
    out_dir = Path(config.out_dir)
    checkpoints = out_dir / "checkpoints"
    start_step = 0
    if ctx.is_main:
        remove_stale_staging(checkpoints)  # left by a run killed while saving
    if resume and (folder := latest_checkpoint(checkpoints)) is not None:
        model_state, optimizer_state, trainer_state = load_training_checkpoint(folder, config.model)
        load_full_state_dict(model, model_state)
        optimizer.load_state_dict(shard_optimizer_state(model, optimizer, optimizer_state))
        scheduler.load_state_dict(trainer_state["scheduler"])
        start_step = trainer_state["step"]
    elif not resume:
        refuse_to_overwrite(checkpoints)
    if ctx.enabled:
        dist.barrier()  # every rank has read the checkpoint before rank 0 may write one
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = _MetricsLog(out_dir, start_step, enabled=ctx.is_main)
    result = TrainResult(model=model, out_dir=out_dir, records=log.records, trainable=trainable)
    config_dict = config_to_dict(config)
    data, optim = config.data, config.optim
    last_step = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = tqdm(
        total=config.steps,
        initial=start_step,
        desc=desc,
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    model.train()
    for step in range(start_step, last_step):
        step_start = time.perf_counter()
        ce_total, aux_total = 0.0, 0.0
        done = step + 1
        is_eval = done % config.eval_every == 0 or done == config.steps
        writes_record = done % config.log_every == 0 or is_eval or done == last_step
        # routing statistics feed only the metrics line: skip their work on the other steps
        with contextlib.nullcontext() if writes_record else without_statistics(model):
            for micro in range(optim.grad_accum):
                index = (step * optim.grad_accum + micro) * ctx.world + ctx.rank
                x, y, segments = _to_device(
                    train_stream.batch(index, data.batch_size, data.seq_len, config.seed), device
                )
                with autocast(device, config.bf16):
                    out = step_model(x) if segments is None else step_model(x, segment_ids=segments)
                    ce = _token_loss(out.logits, y)
                ((ce + out.aux_loss) / optim.grad_accum).backward()
                ce_total += ce.item() / optim.grad_accum
                aux_total += float(out.aux_loss.detach()) / optim.grad_accum
        for group in frozen_groups(
            config.method,
            step,
            schedule=config.alternating,
            separate_expert_steps=config.separate_expert_steps or config.steps // 2,
        ):
            drop_gradients(groups[group])  # frozen this step: no update, no optimizer state
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip))
            if optim.grad_clip > 0
            else float("nan")
        )
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ctx.enabled and not ctx.expert_parallel:
            reduce_load_tallies(model)  # plain data parallelism: every rank's tokens count
        update_expert_bias(model)
        step_time = time.perf_counter() - step_start
        result.train_time += step_time
        result.tokens += optim.grad_accum * data.batch_size * data.seq_len * ctx.world
        if not math.isfinite(ce_total):
            raise FloatingPointError(f"training loss became {ce_total} at step {done}")
        if writes_record:
            record: dict[str, Any] = {
                "step": done,
                "loss": ce_total,
                "aux_loss": aux_total,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_second": optim.grad_accum
                * data.batch_size
                * data.seq_len
                * ctx.world
                / step_time,
                "moe": _moe_record(out.moe_outputs),
                "train_seconds": result.train_time,  # training steps so far (no evaluation)
            }
            if is_eval:
                record["val_loss"] = evaluate(
                    model, val_stream, config.eval_batches, data.batch_size, data.seq_len
                )
            log.write(record)
            if on_record is not None:
                on_record(record)
            bar.set_postfix(
                loss=f"{ce_total:.3f}", **({"val": f"{record['val_loss']:.3f}"} if is_eval else {})
            )
        if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == last_step:
            _checkpoint(ctx, checkpoints, done, model, optimizer, scheduler, config_dict)
        bar.update(1)
    bar.close()
    log.close()
    if step_model is not model:
        # DDP's reducer sits in reference cycles: free it now, while the process group is
        # alive (freed later by the collector, gloo's worker thread can wait for the GIL that
        # the deallocating thread holds, and the process aborts)
        del step_model
        gc.collect()
    result.wall_time = time.perf_counter() - start_time
    return result
