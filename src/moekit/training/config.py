"""Training configuration: one dataclass tree, loaded from TOML/YAML/JSON plus ``key=value``
overrides, validated before any training starts."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from moekit.adapters.lora import LoRAConfig
from moekit.distributed.mesh import ParallelConfig
from moekit.experts.bank import ExpertConfig
from moekit.layers.moe import MoEConfig
from moekit.models.encoder_decoder.model import EncoderDecoderConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.training.data import ByteTokenizer, DataConfig
from moekit.training.methods import AlternatingSchedule, TrainingMethod
from moekit.training.presets import check_preset
from moekit.utils.device import check_device_name
from moekit.utils.serialization import config_from_dict, read_config_file
from moekit.utils.validation import check_fields


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with decoupled weight decay, linear warm-up then cosine decay.

    Args:
        lr: peak learning rate.
        min_lr_ratio: the cosine ends at ``lr * min_lr_ratio``.
        warmup_steps: linear warm-up steps.
        weight_decay: decoupled decay for matrices (not norms, biases or router biases).
        beta1, beta2, eps: AdamW moments.
        grad_clip: global gradient-norm clip (0 disables).
        grad_accum: micro-batches per optimizer step.
    """

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1

    def __post_init__(self) -> None:
        check_fields(self)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"optim.lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("optim.warmup_steps, weight_decay and grad_clip must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("optim.beta1 and optim.beta2 must be in [0, 1)")
        if self.grad_accum < 1:
            raise ValueError(f"optim.grad_accum must be >= 1, got {self.grad_accum}")


DEFAULT_MODEL: dict[str, Any] = {
    "vocab_size": ByteTokenizer.vocab_size,
    "d_model": 128,
    "n_layers": 4,
    "attention": {"n_heads": 4},
    "ffn_hidden": 512,
    "max_seq_len": 256,
}


def _default_model() -> TransformerConfig:
    return config_from_dict(TransformerConfig, copy.deepcopy(DEFAULT_MODEL), "model")


def _default_space() -> list[str]:
    return ["model.moe.layer.top_k=1,2", "model.moe.layer.num_experts=4,8,16"]


@dataclass(kw_only=True)
class EvolutionConfig:
    """``method='evolutionary'``: a CMA-ES search over router configurations
    (``moekit.training.evolution``).

    Args:
        space: the choices, one ``dotted.key=v1,v2,...`` per entry (values parsed like
            ``--set`` values), e.g. ``model.moe.layer.dispatch.capacity_factor=1.0,1.25,2.0``.
        budget: the most distinct candidate configurations trained.
        steps: training steps per candidate (its fitness: the validation loss after them).
        population: CMA-ES population per generation.
    """

    space: list[str] = field(default_factory=_default_space)
    budget: int = 8
    steps: int = 100
    population: int = 4

    def __post_init__(self) -> None:
        check_fields(self)
        for name, low in (("budget", 1), ("steps", 1), ("population", 2)):
            if getattr(self, name) < low:
                raise ValueError(f"evolution.{name} must be >= {low}, got {getattr(self, name)}")
        self.choices()

    def choices(self) -> dict[str, list[Any]]:
        """``{"model.moe.layer.top_k": [1, 2], ...}``."""
        out: dict[str, list[Any]] = {}
        for item in self.space:
            key, _, values = item.partition("=")
            key = key.strip()
            if not key or not values.strip():
                raise ValueError(
                    f"evolution.space entries look like 'model.moe.layer.top_k=1,2', got {item!r}"
                )
            if key in out:
                raise ValueError(f"evolution.space names {key!r} twice")
            out[key] = [_parse_value(v.strip()) for v in values.split(",")]
        if not out:
            raise ValueError("evolution.space is empty: name at least one key and its choices")
        return out


@dataclass(kw_only=True)
class FinetuneConfig:
    """Start from trained weights and train only some of them (``moekit finetune``).

    Args:
        init_from: the weights to start from: a run folder (its latest checkpoint), a moekit
            checkpoint folder, or a Hugging Face model folder; ``None`` trains from scratch.
            ``model`` must describe the same architecture (``moekit finetune`` copies it).
        preset: the parameters to train, presets joined by ``+`` (``moekit.training.presets``:
            ``all``, ``non_moe``, ``moe``, ``attention``, ``ffn``, ``router``,
            ``shared_experts``, ``embeddings``, ``norms``, ``experts:<selection>``); empty:
            everything without LoRA, only the adapters with it.
        lora: LoRA adapters to add and train (``moekit.adapters``), or ``None``.
        routing_batches: training batches counted for ``experts:top=N``.
    """

    init_from: str | None = None
    preset: str = ""
    lora: LoRAConfig | None = None
    routing_batches: int = 8

    def __post_init__(self) -> None:
        check_fields(self)
        if self.init_from is not None and not Path(self.init_from).exists():
            raise FileNotFoundError(f"finetune.init_from {self.init_from!r} does not exist")
        if self.routing_batches < 1:
            raise ValueError(f"finetune.routing_batches must be >= 1, got {self.routing_batches}")
        if self.preset:
            check_preset(self.preset)


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run needs.

    Args:
        model: the transformer (its ``vocab_size`` must be 256 for byte tokens): a decoder-only
            ``TransformerConfig`` or an encoder–decoder ``EncoderDecoderConfig`` (trained on
            T5's prefix-LM objective: each window's first half in, its second half out).
        data: corpus and batch shape.
        optim: optimizer and schedule.
        steps: optimizer steps.
        eval_every: validate every n steps (and at the end).
        eval_batches: validation batches per evaluation.
        log_every: write a metrics line every n steps.
        checkpoint_every: save a checkpoint every n steps (0: only at the end).
        out_dir: run folder (checkpoints, metrics.jsonl).
        seed: seeds the model initialisation and the data order.
        device: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or
            ``mps``; under torchrun, ``cuda``/``auto`` use GPU ``$LOCAL_RANK``.
        bf16: run forward and backward under bfloat16 autocast on that device: ``true``,
            ``false`` or ``"auto"`` (the default: on for CUDA devices that support bf16, off
            elsewhere). On a CPU without native bf16 it warns: bf16 is much slower than fp32
            there.
        working_weights: ``bf16``: the step computes with bf16 copies of the matrix weights kept
            between steps, the fp32 parameters their masters in the optimizer (no per-step cast
            of every weight and gradient; the same numbers as autocast:
            ``moekit.training.working_weights``); ``fp32``: autocast casts the fp32 weights in
            every forward; ``auto`` (the default): ``bf16`` wherever bf16 is on (under a mesh
            FSDP2 keeps bf16 working parameters either way).
        compile: ``dense``: ``torch.compile`` each block's token mixer and dense feed-forward
            (in place; the MoE layers stay eager: ``moekit.models.common.compile``); ``eager``
            (the default): everything eager.
        tf32: on CUDA, fp32 matrix products use TF32 tensor cores
            (``torch.set_float32_matmul_precision("high")``).
        retain_freed_memory: keep freed CPU memory in the process (faster MoE steps; see
            ``moekit.utils.allocator``).
        parallel: how ``torchrun``'s processes split the work (``moekit.distributed.mesh``):
            ``ep`` (experts split over ``ep`` ranks), ``dp_shard`` (FSDP2 sharding; -1: the
            rest), ``dp_replicate``; ``data.batch_size`` is per data-parallel rank (every rank).
        method: ``joint`` (default), ``gradient``, ``separate``, ``alternating`` (see
            ``moekit.training.methods``) or ``evolutionary`` (a search over router
            configurations, then the winner trained: ``moekit.training.evolution``).
        alternating: the blocks of ``method='alternating'``.
        separate_expert_steps: ``method='separate'``: steps before the routers alone train (0:
            half of ``steps``).
        evolution: the search of ``method='evolutionary'``.
        finetune: starting weights, the parameters to train, LoRA.
    """

    model: TransformerConfig | EncoderDecoderConfig = field(default_factory=_default_model)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 300
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 0
    out_dir: str = "runs/train"
    seed: int = 0
    device: str = "auto"
    bf16: bool | str = "auto"
    working_weights: str = "auto"
    compile: str = "eager"
    tf32: bool = True
    retain_freed_memory: bool = True
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    method: TrainingMethod = TrainingMethod.JOINT
    alternating: AlternatingSchedule = field(default_factory=AlternatingSchedule)
    separate_expert_steps: int = 0
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    #: keys that moved, named by their new home in the error for an old config file
    moved_keys: ClassVar[dict[str, str]] = {"expert_parallel": "parallel.ep"}

    def __post_init__(self) -> None:
        check_fields(self)
        check_device_name(self.device)
        if self.bf16 not in (True, False, "auto"):
            raise ValueError(f"bf16 must be true, false or 'auto', got {self.bf16!r}")
        if self.compile not in ("eager", "dense"):
            raise ValueError(f"compile must be 'eager' or 'dense', got {self.compile!r}")
        if self.working_weights not in ("auto", "bf16", "fp32"):
            raise ValueError(
                f"working_weights must be 'auto', 'bf16' or 'fp32', got {self.working_weights!r}"
            )
        finetune = self.finetune
        if self.parallel.ep > 1 and (
            (finetune.lora is not None and "experts" in finetune.lora.targets)
            or "experts:" in finetune.preset
        ):
            raise ValueError(
                "expert LoRA and experts:<selection> presets run in one process or under plain "
                "data parallelism, not with parallel.ep > 1"
            )
        if self.method is TrainingMethod.EM:
            raise ValueError(
                "method='em' (expectation-maximisation) trains classic mixtures (moekit.classic); "
                "a language model trains with joint, gradient, separate, alternating or "
                "evolutionary"
            )
        if self.method is TrainingMethod.EVOLUTIONARY and self.parallel.ep > 1:
            raise ValueError("method='evolutionary' runs in one process (parallel.ep=1)")
        if self.separate_expert_steps < 0:
            raise ValueError(
                f"separate_expert_steps must be >= 0, got {self.separate_expert_steps}"
            )
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        for name in ("eval_every", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.data.tokenizer is None and self.model.vocab_size != ByteTokenizer.vocab_size:
            raise ValueError(
                f"model.vocab_size must be {ByteTokenizer.vocab_size} for byte tokens, got "
                f"{self.model.vocab_size}: set data.tokenizer=FOLDER to the Hugging Face "
                "tokenizer this vocabulary belongs to (a run folder's tokenizer/ holds a copy)"
            )
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len="
                f"{self.model.max_seq_len}"
            )


def _read_file(path: Path) -> dict[str, Any]:
    return read_config_file(path)


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as JSON where possible)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        node = data
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = _parse_value(raw.strip())
    return data


def load_train_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, updated by the file at ``path`` (if any), then by ``overrides``."""
    # Start from the explicitly chosen defaults only, so derived fields (attention.n_kv_heads,
    # attention.head_dim) follow whatever the file or the overrides set.
    data: dict[str, Any] = {"model": copy.deepcopy(DEFAULT_MODEL)}
    if path is not None:
        from_file = _read_file(Path(path))
        model = from_file.get("model")
        if isinstance(model, dict) and "n_encoder_layers" in model:
            data["model"] = {}  # an encoder–decoder: the decoder-only defaults do not apply
        _merge(data, from_file)
    apply_overrides(data, overrides or [])
    return config_from_dict(TrainConfig, data)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def example_moe_layer(model: TransformerConfig) -> Any:
    """An MoE layer for ``model`` as ``--print-config`` shows it: 8 experts of half the dense
    FFN's width, top-2 (the demo's layer)."""

    return MoEConfig(
        num_experts=8,
        top_k=2,
        experts=ExpertConfig(hidden=max(1, model.ffn_hidden // 2)),
    )
