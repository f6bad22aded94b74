"""The elastic-k curve: validation loss and decode tokens/s at each compute budget (real
experts per token) of a model trained with null experts, against the same top-k model whose
budget can only be cut by ``set_top_k``.

Both are the demo's MoE (``moekit demo``: byte-level LM on the Python standard library, d_model
128, 4 layers, 8 experts of width 256, top-2, batch 16 × 128, ``--steps`` steps):

- **top-2**: the demo's MoE; its budgets are k = 2 and k = 1 (``moekit.set_top_k``);
- **null**: the same plus 8 zero experts in the router's choice
  (``ZeroComputationConfig(zero=8, target_experts_per_token=--target)``), trained with the
  controller steering the real experts per token to ``--target``; after training
  ``moekit.set_compute_budget`` sets each budget on a calibration batch.

Validation loss over ``--eval-batches`` windows of the held-out split; decode speed: greedy
generation of ``--new-tokens`` tokens for a batch of ``--decode-batch`` prompts with the KV
cache, every budget timed in each of ``--rounds`` rounds in alternation (median), one seed.
Validation losses are given for each of ``--seeds`` seeds (mean and min–max).

    python benchmarks/bench_elastic_k.py                      # ~25 minutes on 2 cores
    python benchmarks/bench_elastic_k.py --steps 100 --seeds 1 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

import moekit
from moekit.cli.demo import PRESETS, demo_train_configs
from moekit.experts.zero_computation import ZeroComputationConfig
from moekit.models import generate
from moekit.training.data import load_corpus
from moekit.training.loop import evaluate, train

BUDGETS = (2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5)


def configs(steps: int, seed: int, target: float, out: Path):
    preset = {**PRESETS["default"], "steps": steps, "eval_every": steps}
    _, top2 = demo_train_configs(preset, seed=seed, out_dir=out / f"top2-{seed}")
    layer = top2.model.moe.layer
    zero = ZeroComputationConfig(zero=8, target_experts_per_token=target, offset_rate=2e-3)
    null_layer = dataclasses.replace(layer, zero_computation=zero)
    null_model = dataclasses.replace(
        top2.model, moe=dataclasses.replace(top2.model.moe, layer=null_layer)
    )
    null = dataclasses.replace(top2, model=null_model, out_dir=str(out / f"null-{seed}"))
    return top2, null


def decode_seconds(model, prompts: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    generate(model, prompts, max_new_tokens=new_tokens, temperature=0.0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=float, default=1.5)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    losses: dict[str, list[float]] = {}
    reached: dict[float, list[float]] = {}  # the calibration batch's real experts per token
    speed_model: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            top2_cfg, null_cfg = configs(args.steps, seed, args.target, Path(tmp))
            _, val = load_corpus(top2_cfg.data)
            calibration = next(iter(val.eval_batches(1, 16, 128)))[0]
            top2 = train(top2_cfg, progress=False).model.eval()
            null = train(null_cfg, progress=False).model.eval()

            def val_loss(model, val=val) -> float:
                return evaluate(model, val, args.eval_batches, 16, 128)

            for k in (2, 1):
                moekit.set_top_k(top2, k)
                losses.setdefault(f"top-2 model, set_top_k({k})", []).append(val_loss(top2))
            moekit.set_top_k(top2, 2)
            trained = [float(m.router.null_slots.offset) for m in moekit.layers.moe_layers(null)]
            losses.setdefault("null model, as trained", []).append(val_loss(null))
            offsets = {}
            for budget in BUDGETS:
                achieved = moekit.set_compute_budget(null, budget, calibration)
                offsets[budget] = [
                    float(m.router.null_slots.offset) for m in moekit.layers.moe_layers(null)
                ]
                reached.setdefault(budget, []).append(statistics.mean(achieved))
                losses.setdefault(f"null model, budget {budget:g}", []).append(val_loss(null))
            if seed == 0:
                speed_model = {"top2": top2, "null": null, "offsets": offsets, "trained": trained}
        print(
            f"validation loss (nats/byte), {args.seeds} seed(s), {args.steps} steps, "
            f"null target {args.target}:"
        )
        for name, values in losses.items():
            print(
                f"  {name:38s} {statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})"
            )
        print(f"  null model's trained offsets (seed 0): {speed_model['trained']}")
        print(
            "  budgets reached on the calibration batch (mean over layers and seeds): "
            + ", ".join(f"{b:g}: {statistics.mean(v):.3f}" for b, v in reached.items())
        )
        top2, null = speed_model["top2"], speed_model["null"]
        prompts = next(iter(load_corpus(top2_cfg.data)[1].eval_batches(1, args.decode_batch, 16)))[
            0
        ]
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):  # every setting in each round, in alternation
            for k in (2, 1):
                moekit.set_top_k(top2, k)
                times.setdefault(f"top-2 model, k={k}", []).append(
                    decode_seconds(top2, prompts, args.new_tokens)
                )
            moekit.set_top_k(top2, 2)
            for budget, per_layer in speed_model["offsets"].items():
                for layer, offset in zip(moekit.layers.moe_layers(null), per_layer, strict=True):
                    layer.router.null_slots.offset.fill_(offset)
                times.setdefault(f"null model, budget {budget:g}", []).append(
                    decode_seconds(null, prompts, args.new_tokens)
                )
        reference = statistics.median(times["top-2 model, k=2"])
        print(
            f"decode: {args.decode_batch} prompts × {args.new_tokens} new tokens, KV cache, "
            f"median of {args.rounds} rounds:"
        )
        for name, values in times.items():
            seconds = statistics.median(values)
            rate = args.decode_batch * args.new_tokens / seconds
            print(f"  {name:38s} {rate:8.1f} tokens/s  ({reference / seconds:.2f}× top-2's)")


if __name__ == "__main__":
    main()
