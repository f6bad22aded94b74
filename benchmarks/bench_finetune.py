"""Fine-tuning MoE language models: ST-MoE's parameter-subset table and the Flan-MoE question.

The Python standard library's modules are split three ways by a hash of the file name: part A
is pre-training text, part B gives instruction examples (complete a function from its
signature and docstring), part C gives a downstream task (write a function's docstring from
its code). No part sees another's files.

1. ST-MoE table (Zoph et al. 2022, section 4): pre-train an MoE LM (an MoE every other block,
   so dense FFN layers exist) on A, then fine-tune on B's instructions, training only All,
   Non-MoE, MoE, Attention or FFN parameters, or LoRA adapters (rank 8 on attention and the
   experts). Report B's held-out response loss, trainable parameters and time.
2. Instruction tuning (Shen et al. 2023, "Mixture-of-Experts Meets Instruction Tuning"):
   pre-train a dense LM and its MoE twin (same active parameters) on A; each goes straight to
   C's downstream task, or first through instruction tuning on B. Does the MoE gain more from
   the instruction stage?

With ``--arch encoder-decoder`` both experiments run on the seeds' own architecture: a T5
encoder–decoder and its Switch twin (8 experts of the dense FFN's width, top-1, so the same
active parameters; an MoE every other block of both stacks, capacity factor 1.25, Switch's
load-balancing loss 0.01), pre-trained with T5's prefix-LM objective on A, fine-tuned on B and
C as sequence-to-sequence pairs (the prompt into the encoder, the response out of the decoder;
``moekit.training.seq2seq``).

Pre-training runs once (seed 0); every fine-tuning stage runs for ``--seeds`` seeds (data order
and adapter initialisation). Medians and ranges over seeds, fp32, 2 threads.

    python benchmarks/bench_finetune.py                  # both experiments, 3 seeds (~25 min)
    python benchmarks/bench_finetune.py --quick          # a smoke run of both (~2 min)
    python benchmarks/bench_finetune.py --arch encoder-decoder --out reports/finetune_t5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
import zlib
from pathlib import Path

import torch

from moekit.adapters.lora import LoRAConfig
from moekit.analysis.plots import plot_val_loss
from moekit.dispatch.config import DispatchMode, DropPriority
from moekit.dispatch.dispatcher import DispatchConfig
from moekit.experts.bank import ExpertConfig
from moekit.layers import MoEConfig
from moekit.losses.config import AuxLossConfig
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.encoder_decoder import EncoderDecoderConfig
from moekit.routing import Gating, TopKRouterConfig
from moekit.training.compare import moe_twin
from moekit.training.config import FinetuneConfig, TrainConfig, load_train_config
from moekit.training.data import DataConfig, standard_library_files
from moekit.training.instruct import documented_functions, standard_library_instructions
from moekit.training.loop import train
from moekit.utils.serialization import config_from_dict, config_to_dict

PRESETS = ["all", "non_moe", "moe", "attention", "ffn", "lora"]
TRAIN_CONFIG = "train_config.json"


def part_of(name: str) -> str:
    return "ABC"[zlib.crc32(name.encode()) % 3]


def write_parts(root: Path) -> dict[str, Path]:
    """Part A as a text folder, B and C as instruction JSON lines."""
    text = root / "A_text"
    text.mkdir(parents=True, exist_ok=True)
    for path in standard_library_files():
        if part_of(path.name) == "A":
            shutil.copyfile(path, text / path.name)
    instructions = root / "B_instructions.jsonl"
    with open(instructions, "w") as f:
        for name, messages in standard_library_instructions(max_chars=600):
            if part_of(name.split(":")[0]) == "B":
                f.write(json.dumps({"messages": messages, "source": name}) + "\n")
    downstream = root / "C_docstrings.jsonl"
    with open(downstream, "w") as f:
        for path in standard_library_files():
            if part_of(path.name) == "C":
                for prompt, response in docstring_examples(path):
                    record = {"prompt": prompt, "response": response, "source": f"{path.name}:"}
                    f.write(json.dumps(record) + "\n")
    return {"A": text, "B": instructions, "C": downstream}


def docstring_examples(path: Path, max_chars: int = 600):
    """(code without its docstring, the docstring) for each documented top-level function."""
    for function in documented_functions(path):
        if len(function.code) + len(function.docstring) <= max_chars:
            yield (
                f"Write the docstring of this function:\n{function.code}",
                function.docstring + "\n",
            )


def base_config(args, out: Path, data: Path, seed: int = 0) -> TrainConfig:
    return load_train_config(
        None,
        [
            f"steps={args.pretrain_steps}",
            f"eval_every={args.pretrain_steps}",
            "eval_batches=8",
            "log_every=50",
            f"out_dir={out}",
            f"seed={seed}",
            f"data.path={data}",
            "data.seq_len=256",
            "data.batch_size=8",
            "model.d_model=128",
            "model.n_layers=4",
            "model.ffn_hidden=512",
            "model.max_seq_len=256",
            "optim.lr=2e-3",
            f"optim.warmup_steps={max(1, args.pretrain_steps // 20)}",
        ],
    )


def encoder_decoder_config(args, out: Path, data: Path) -> TrainConfig:
    """The dense T5 twin: 2 + 2 blocks of width 128, ReLU FFNs of 512, T5's relative
    positions, tied embeddings."""
    config = base_config(args, out, data)
    model = EncoderDecoderConfig(
        vocab_size=256,
        d_model=128,
        n_heads=4,
        ffn_hidden=512,
        n_encoder_layers=2,
        n_decoder_layers=2,
        max_seq_len=256,
    )
    return dataclasses.replace(config, model=model)


def switch_of(config: TrainConfig) -> TrainConfig:
    """The Switch twin of a T5 config: 8 experts of the dense FFN's width, top-1 (the same
    active parameters), every other block of each stack, capacity factor 1.25 (token priority,
    causal in the decoder), Switch's load-balancing loss 0.01."""
    model = config.model
    assert isinstance(model, EncoderDecoderConfig)
    layer = MoEConfig(
        num_experts=8,
        top_k=1,
        experts=ExpertConfig(hidden=model.ffn_hidden, activation=model.activation),
        router=TopKRouterConfig(gating=Gating.SOFTMAX_TOPK, normalize_weights=False),
        dispatch=DispatchConfig(
            mode=DispatchMode.CAPACITY, capacity_factor=1.25, drop_priority=DropPriority.TOKEN
        ),
        aux_loss=AuxLossConfig(switch=0.01),
    )
    placement = MoEPlacementConfig(layer=layer, every=2)
    switch = dataclasses.replace(model, encoder_moe=placement, decoder_moe=placement)
    return dataclasses.replace(config, model=switch)


def moe_of(config: TrainConfig) -> TrainConfig:
    """The MoE twin: 8 experts of width ffn_hidden/2, top-2, in every other block (the Switch
    twin for an encoder–decoder)."""
    if isinstance(config.model, EncoderDecoderConfig):
        return switch_of(config)
    twin = moe_twin(config, 8, 2)
    placement = dataclasses.replace(twin.model.moe, every=2)
    return dataclasses.replace(twin, model=dataclasses.replace(twin.model, moe=placement))


def finetune_config(
    args, source: Path, out: Path, data: Path, seed: int, preset: str
) -> TrainConfig:
    config = config_from_dict(TrainConfig, json.loads((source / TRAIN_CONFIG).read_text()))
    lora = None
    if preset == "lora":
        model = config.model
        moe_layer = (
            model.encoder_moe.layer if isinstance(model, EncoderDecoderConfig) else model.moe.layer
        )
        targets = ["attention", "experts" if moe_layer is not None else "ffn"]
        lora = LoRAConfig(rank=8, alpha=16.0, targets=targets)
    return dataclasses.replace(
        config,
        steps=args.finetune_steps,
        eval_every=max(1, args.finetune_steps // 3),
        eval_batches=16,
        log_every=25,
        out_dir=str(out),
        seed=seed,
        data=DataConfig(path=str(data), instruction=True, seq_len=256, batch_size=8),
        optim=dataclasses.replace(config.optim, lr=args.lr, warmup_steps=10),
        finetune=FinetuneConfig(
            init_from=str(source), preset="" if preset in ("all", "lora") else preset, lora=lora
        ),
    )


def run(config: TrainConfig) -> dict:
    shutil.rmtree(config.out_dir, ignore_errors=True)
    start = time.perf_counter()
    result = train(config, progress=False)
    trainable = dict((g, t) for g, t, _ in result.trainable)["all"]
    return {
        "val_loss": result.final_val_loss,
        "best_val_loss": min(v for _, v in result.evals),
        "curve": result.evals,
        "trainable": trainable,
        "seconds": time.perf_counter() - start,
    }


def pretrain(config: TrainConfig, reuse: bool = False) -> Path:
    if reuse and Path(config.out_dir, TRAIN_CONFIG).is_file():
        print(f"reusing {config.out_dir}")
        return Path(config.out_dir)
    shutil.rmtree(config.out_dir, ignore_errors=True)
    result = train(config, progress=False)
    _save_train_config(config)
    print(f"pre-trained {config.out_dir}: validation loss {result.final_val_loss:.4f}")
    return Path(config.out_dir)


def _save_train_config(config: TrainConfig) -> None:
    """The run's TrainConfig beside its checkpoints, where ``finetune_config`` reads it."""
    Path(config.out_dir, TRAIN_CONFIG).write_text(json.dumps(config_to_dict(config), indent=2))


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def st_moe_table(args, parts, out: Path, moe_source: Path) -> list[str]:
    rows, curves = {}, {}
    for preset in args.presets:
        for seed in range(args.seeds):
            cfg = finetune_config(
                args, moe_source, out / f"st_{preset}_{seed}", parts["B"], seed, preset
            )
            rows.setdefault(preset, []).append(run(cfg))
            print(f"ST-MoE {preset} seed {seed}: {rows[preset][-1]['val_loss']:.4f}")
        curves[preset] = rows[preset][0]["curve"]
    plot_val_loss(curves, out / f"finetune_curves_st_moe_lr{args.lr:g}.png")
    lines = [
        "| trained | parameters | B validation loss (median, range) | best | s per run |",
        "|---|---:|---|---|---:|",
    ]
    for preset, runs in rows.items():
        lines.append(
            f"| {preset} | {runs[0]['trainable']:,} | {spread([r['val_loss'] for r in runs])} | "
            f"{spread([r['best_val_loss'] for r in runs])} | "
            f"{statistics.median(r['seconds'] for r in runs):.0f} |"
        )
    (out / f"st_moe_lr{args.lr:g}.json").write_text(json.dumps(rows, indent=2))
    return lines


def instruction_experiment(args, parts, out: Path, sources: dict[str, Path]) -> list[str]:
    results: dict[tuple[str, bool], list[float]] = {}
    curves = {}
    for name, source in sources.items():
        for seed in range(args.seeds):
            tuned = finetune_config(
                args, source, out / f"it_{name}_{seed}", parts["B"], seed, "all"
            )
            run(tuned)
            _save_train_config(tuned)
            for instructed in (False, True):
                start_from = Path(tuned.out_dir) if instructed else source
                cfg = finetune_config(
                    args,
                    start_from,
                    out / f"down_{name}_{instructed}_{seed}",
                    parts["C"],
                    seed,
                    "all",
                )
                outcome = run(cfg)
                results.setdefault((name, instructed), []).append(outcome["val_loss"])
                if seed == 0:
                    curves[f"{name}{' + instruction' if instructed else ''}"] = outcome["curve"]
                loss = outcome["val_loss"]
                print(f"downstream {name} instructed={instructed} seed {seed}: {loss:.4f}")
    plot_val_loss(curves, out / "finetune_curves_instruction.png")
    lines = [
        "| model | downstream loss, straight | after instruction tuning | gain (median of "
        "per-seed differences) |",
        "|---|---|---|---:|",
    ]
    for name in sources:
        plain, tuned = results[(name, False)], results[(name, True)]
        gain = statistics.median(p - t for p, t in zip(plain, tuned, strict=True))
        lines.append(f"| {name} | {spread(plain)} | {spread(tuned)} | {gain:+.4f} |")
    (out / "instruction.json").write_text(
        json.dumps({f"{k[0]}_{k[1]}": v for k, v in results.items()}, indent=2)
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default="reports/finetune")
    parser.add_argument("--quick", action="store_true", help="1 seed, 40/20 steps")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse pre-trained models already in --out"
    )
    parser.add_argument("--presets", nargs="+", default=PRESETS, choices=PRESETS)
    parser.add_argument(
        "--arch",
        default="decoder",
        choices=["decoder", "encoder-decoder"],
        help="decoder-only LMs, or the seeds' T5 / Switch encoder–decoders",
    )
    parser.add_argument(
        "--experiments", nargs="+", default=["st", "instruction"], choices=["st", "instruction"]
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.pretrain_steps, args.finetune_steps = 1, 40, 20
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = write_parts(out / "data")
    if args.arch == "encoder-decoder":
        dense = encoder_decoder_config(args, out / "pre_dense", parts["A"])
    else:
        dense = base_config(args, out / "pre_dense", parts["A"])
    moe = dataclasses.replace(moe_of(dense), out_dir=str(out / "pre_moe"))
    sources = {"dense": pretrain(dense, args.reuse), "moe": pretrain(moe, args.reuse)}
    report = [
        f"# Fine-tuning (benchmarks/bench_finetune.py --arch {args.arch})",
        "",
        "## ST-MoE table",
        "",
    ]
    if "st" in args.experiments:
        report += st_moe_table(args, parts, out, sources["moe"])
    if "instruction" in args.experiments:
        report += ["", "## Instruction tuning: dense vs MoE", ""]
        report += instruction_experiment(args, parts, out, sources)
    (out / "summary.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
