"""Merging against pruning at equal expert count: REAM vs REAP (and frequency pruning and
moekit's frequency merge) on the demo's MoE.

The demo's MoE (``moekit demo``: byte-level LM on the Python standard library, d_model 128,
4 layers, 8 experts of width 256, top-2, batch 16 × 128) trains ``--steps`` steps; then each
method removes ``--fractions`` of every layer's experts, calibrated on ``--calibration``
windows of the training split, and the validation loss (``--eval-batches`` held-out windows)
is measured, with no further training. ``--seeds`` seeds (mean and min–max).

    python benchmarks/bench_ream.py                       # ~12 minutes on 2 cores
    python benchmarks/bench_ream.py --steps 100 --seeds 1 # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from moekit.cli.demo import PRESETS, demo_train_configs
from moekit.training.compress import merge, prune
from moekit.training.data import load_corpus
from moekit.training.loop import evaluate, train
from moekit.training.ream import ream_merge

METHODS = {
    "prune, frequency": lambda m, b, f: prune(m, b, f, method="frequency")[0],
    "prune, REAP (saliency)": lambda m, b, f: prune(m, b, f, method="saliency")[0],
    "merge, frequency + router rows": lambda m, b, f: merge(m, b, f)[0],
    "merge, REAM": lambda m, b, f: ream_merge(m, b, f)[0],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--calibration", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            preset = {**PRESETS["default"], "steps": args.steps, "eval_every": args.steps}
            _, config = demo_train_configs(preset, seed=seed, out_dir=Path(tmp) / str(seed))
            train_stream, val = load_corpus(config.data)
            model = train(config, progress=False).model.eval()
            calibration = [x for x, *_ in train_stream.eval_batches(args.calibration, 8, 128)]

            def val_loss(m, val=val) -> float:
                return evaluate(m, val, args.eval_batches, 16, 128)

            results.setdefault("8 experts (no removal)", []).append(val_loss(model))
            for fraction in args.fractions:
                for name, method in METHODS.items():
                    shrunk = method(model, calibration, fraction).eval()
                    kept = 8 - round(8 * fraction)
                    results.setdefault(f"{kept} experts: {name}", []).append(val_loss(shrunk))
    print(
        f"validation loss (nats/byte), demo MoE after {args.steps} steps, {args.seeds} "
        "seed(s), mean (min-max):"
    )
    for name, values in results.items():
        print(f"  {name:42s} {statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})")


if __name__ == "__main__":
    main()
