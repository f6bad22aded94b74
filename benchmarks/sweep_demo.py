"""Sweep the demo's MoE configuration and learning rates: which MoE beats the dense model on the
clock at equal active parameters per token?

Every run is the demo's (``moekit demo``: byte-level LM on the Python standard library, d_model
128, 4 layers, dense FFN 512, batch 16 x 128, ``--steps`` steps with warm-up and cosine decay).
The dense model and each MoE candidate train at every learning rate of ``--lrs`` (the same grid
and step budget for each, so the tuning is fair); each model keeps its best rate (lowest final
validation loss). For each candidate at its best rate, against the dense model at its best:
the steps and the training seconds (evaluation excluded) it took to reach the dense model's
final validation loss. Runs are sequential, one at a time (2 threads each).

Candidates are ``E<experts>k<top_k>[s<shared width>]``: routed experts of width
``(512 - shared) / k``, so the active FFN width is the dense model's 512.

    python benchmarks/sweep_demo.py                              # ~45 minutes
    python benchmarks/sweep_demo.py --candidates E8k2 E16k4 --batch-size 32 --steps 400
    python benchmarks/sweep_demo.py --candidates E8k2 E8k1s256 --lrs 3e-3 --steps 300
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

from moekit.cli.demo import PRESETS, demo_train_configs
from moekit.training.compare import Comparison, param_reports
from moekit.training.loop import TrainResult, train


def parse_candidate(name: str) -> dict[str, int]:
    match = re.fullmatch(r"E(\d+)k(\d+)(?:s(\d+))?", name)
    if match is None:
        raise ValueError(f"candidate {name!r} must look like E8k2 or E8k1s256")
    experts, top_k, shared = match.groups()
    return {"experts": int(experts), "top_k": int(top_k), "shared_hidden": int(shared or 0)}


def summary(run: TrainResult) -> dict:
    return {
        "final_val_loss": run.final_val_loss,
        "train_seconds": run.train_time,
        "tokens_per_s": run.tokens_per_second,
        "evals": [
            (r["step"], r["val_loss"], r["train_seconds"]) for r in run.records if "val_loss" in r
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--candidates", nargs="+", default=["E8k2", "E8k1", "E8k1s256", "E16k2", "E16k4", "E32k2"]
    )
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 4e-3])
    parser.add_argument("--steps", type=int, default=PRESETS["default"]["steps"])
    parser.add_argument("--batch-size", type=int, default=PRESETS["default"]["batch_size"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="reports/sweep_demo.json")
    args = parser.parse_args()
    preset = {**PRESETS["default"], "steps": args.steps, "batch_size": args.batch_size}
    results: dict[str, dict[float, TrainResult]] = {"dense": {}}
    configs = {name: parse_candidate(name) for name in args.candidates}
    with tempfile.TemporaryDirectory() as folder:
        for lr in args.lrs:
            for name, options in {"dense": {}, **configs}.items():
                dense_cfg, moe_cfg = demo_train_configs(
                    preset,
                    lr=lr,
                    seed=args.seed,
                    out_dir=Path(folder) / f"{name}-{lr}",
                    **options,
                )
                run = train(dense_cfg if name == "dense" else moe_cfg, progress=False)
                results.setdefault(name, {})[lr] = run
                print(
                    f"{name:10s} lr {lr:g}: final val loss {run.final_val_loss:.4f}, "
                    f"{run.tokens_per_second:,.0f} tokens/s, {run.train_time:.0f} s",
                    flush=True,
                )
    best = {
        name: min(runs, key=lambda lr: runs[lr].final_val_loss) for name, runs in results.items()
    }
    dense = results["dense"][best["dense"]]
    dense_cfg, _ = demo_train_configs(preset)
    table = []
    for name, options in configs.items():
        moe = results[name][best[name]]
        _, moe_cfg = demo_train_configs(preset, **options)
        comparison = Comparison(dense, moe, *param_reports(dense_cfg, moe_cfg))
        table.append(
            {
                "candidate": name,
                "lr": best[name],
                "final_val_loss": moe.final_val_loss,
                "steps_ratio": comparison.step_ratio,
                "time_ratio": comparison.time_ratio,
                "tokens_per_s_ratio": moe.tokens_per_second / dense.tokens_per_second,
                "active_params": comparison.moe_params.active,
            }
        )
    print(
        f"\ndense: best lr {best['dense']:g}, final val loss {dense.final_val_loss:.4f}, "
        f"{dense.tokens_per_second:,.0f} tokens/s, "
        f"active params {param_reports(dense_cfg, dense_cfg)[0].active:,}"
    )
    print(
        "candidate  best lr  final val loss  steps to dense loss  time to dense loss  "
        "tokens/s vs dense"
    )
    for row in table:
        steps = "not reached" if row["steps_ratio"] is None else f"{row['steps_ratio']:.2f}x"
        seconds = "—" if row["time_ratio"] is None else f"{row['time_ratio']:.2f}x"
        print(
            f"{row['candidate']:10s} {row['lr']:<8g} {row['final_val_loss']:14.4f}  {steps:>19s}  "
            f"{seconds:>18s}  {row['tokens_per_s_ratio']:17.2f}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "steps": args.steps,
                "batch_size": args.batch_size,
                "lrs": args.lrs,
                "best_lr": best,
                "runs": {
                    n: {str(lr): summary(r) for lr, r in runs.items()}
                    for n, runs in results.items()
                },
                "table": table,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
