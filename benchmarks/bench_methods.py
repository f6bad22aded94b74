"""Each routing method of the research issue against top-k on the demo's LM: same active expert
FLOPs per token, same tokens, ``--seeds`` seeds.

The demo's MoE (``moekit demo``: byte-level LM on the Python standard library, d_model 128,
4 layers, batch 16 × 128, ``--steps`` steps, lr 2e-3 with warm-up and cosine decay, the
Switch loss at 0.01), its FFN in every layer an MoE of 8 experts:

- ``top-2``: experts of width 256, top-2 (active expert width 512);
- ``expert threshold``: the same experts, Expert-Threshold routing with c = 2 (2 experts per
  token on average, causal);
- ``null experts``: top-2 among the 8 experts and 8 zero experts, the controller steering to
  1.5 real experts per token (active width 384: less compute, on purpose);
- ``causal soft``: 8 experts of width 64, one slot each per token (all 8 slot outputs per
  token: active width 512), causal Soft MoE.

Reported per method (mean, min–max over seeds): final validation loss, training tokens/s (the
runs go one after another, 2 threads, so the rates compare), the busiest expert's load as a
multiple of the equal share and the dead experts (load < 1 % of it), averaged over layers from
the last metrics line.

    python benchmarks/bench_methods.py                       # ~20 minutes on 2 cores
    python benchmarks/bench_methods.py --steps 100 --seeds 1 # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from pathlib import Path

import torch

import moekit
from moekit.cli.demo import PRESETS, demo_train_configs
from moekit.experts.zero_computation import ZeroComputationConfig
from moekit.training.loop import train


def variants(config):
    layer = config.model.moe.layer

    def with_layer(**changes):
        new_layer = dataclasses.replace(layer, **changes)
        model = dataclasses.replace(
            config.model, moe=dataclasses.replace(config.model.moe, layer=new_layer)
        )
        return dataclasses.replace(config, model=model)

    return {
        "top-2": config,
        "expert threshold (c=2)": with_layer(
            router=moekit.ExpertThresholdRouterConfig(capacity_factor=2.0)
        ),
        "null experts (target 1.5)": with_layer(
            zero_computation=ZeroComputationConfig(
                zero=8, target_experts_per_token=1.5, offset_rate=2e-3
            )
        ),
        "causal soft (8 × width 64)": with_layer(
            router=moekit.CausalSoftRouterConfig(slots_per_expert=1),
            top_k=1,
            experts=dataclasses.replace(layer.experts, hidden=64),
            aux_loss=dataclasses.replace(layer.aux_loss, switch=0.0),
        ),
    }


def summary(result) -> dict[str, float]:
    last = next(r for r in reversed(result.records) if r.get("moe"))
    layers = [m for m in last["moe"] if "load" in m]
    out = {
        "val_loss": result.final_val_loss,
        "tokens_per_s": result.tokens_per_second,
        "max_load": statistics.mean(m["load"]["max"] for m in layers) if layers else float("nan"),
        "dead": statistics.mean(m["load"]["dead"] for m in layers) if layers else 0.0,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            preset = {**PRESETS["default"], "steps": args.steps, "eval_every": args.steps}
            _, base = demo_train_configs(preset, seed=seed, out_dir=Path(tmp) / str(seed))
            for name, config in variants(base).items():
                config = dataclasses.replace(config, out_dir=str(Path(tmp) / f"{seed}-{name}"))
                results.setdefault(name, []).append(summary(train(config, progress=False)))
    print(f"demo LM, {args.steps} steps, {args.seeds} seed(s): mean (min-max)")
    for name, runs in results.items():
        cells = []
        for key, fmt in (
            ("val_loss", ".4f"),
            ("tokens_per_s", ".0f"),
            ("max_load", ".2f"),
            ("dead", ".2f"),
        ):
            values = [r[key] for r in runs]
            cells.append(
                f"{key} {statistics.mean(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"
            )
        print(f"  {name:28s} " + "; ".join(cells))


if __name__ == "__main__":
    main()
