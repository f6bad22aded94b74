"""What a training run holds while it runs: its state for the step and the callbacks
(``TrainingRun``), one step's output (``StepOutput``), what it returns (``TrainResult``), its
metrics log and its checkpoint writer."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moekit.models.encoder_decoder.model import EncoderDecoderLM
from moekit.models.transformer.model import TransformerLM
from moekit.training.checkpoint import (
    parameter_names,
    rng_states,
    save_sharded_training_checkpoint,
    save_training_checkpoint,
)
from moekit.training.config import TrainConfig
from moekit.training.working_weights import WorkingWeights
from moekit.utils.serialization import atomic_write_bytes


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
def save_run_checkpoint(
    ctx, device, checkpoints, step, model, optimizer, scheduler, config_dict
) -> None:
    """One process: the single-process layout (``model.safetensors``). On a mesh: a sharded
    checkpoint every rank writes its part of (it loads on any mesh, or in one process). Both
    hold every rank's generator states."""
    states = rng_states(ctx.rank, ctx.world, device)
    if not ctx.enabled:
        save_training_checkpoint(
            checkpoints,
            step,
            model,
            optimizer.state_dict(),
            scheduler,
            config_dict,
            states,
            param_names=parameter_names(model, optimizer),
        )
        return
    # every rank writes its own shards (DCP); nothing is gathered to one rank
    save_sharded_training_checkpoint(
        checkpoints, step, model, optimizer, scheduler, config_dict, states
    )


class MetricsLog:
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
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (optional: tensorboard)

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
    log: MetricsLog
    result: TrainResult
    # bf16 copies of the matrix weights the step computes with (one process, bf16 on)
    working_weights: WorkingWeights | None = None


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
