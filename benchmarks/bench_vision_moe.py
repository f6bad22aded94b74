"""Quality per FLOP in vision: token choice vs expert choice vs Soft MoE on the embedded digits.

The Soft MoE paper (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts") reports
that Soft MoE beats sparse token-choice and expert-choice routing at equal cost. This trains the
V-MoE layout (``moekit.models.VisionMoE``: an MoE FFN in every other block) on scikit-learn's
bundled 8x8 digits (1797 images; 16 patches of 2x2 per image) with

- ``token_choice``: top-1 of E experts per patch (dropless, Switch loss 0.01),
- ``expert_choice``: each expert takes its top ``T / E`` patches of the batch (capacity 1),
- ``soft``: Soft MoE with ``16 / E`` slots per expert per image,
- ``dense``: the dense ViT with one expert's width (the same active FLOPs), for reference,

so every MoE layer runs 16 expert evaluations per image. FLOPs per image are counted by
``torch.utils.flop_counter.FlopCounterMode`` over one forward (with a formula registered here
for ``aten._grouped_mm``, which it does not count on its own). The learning rate is picked per
method on a validation split (the same grid and budget for each); the test accuracy is
reported at that rate over ``--seeds`` seeds (mean and spread). Runs use one thread each.

    python benchmarks/bench_vision_moe.py                    # 3 seeds, ~10 minutes
    python benchmarks/bench_vision_moe.py --seeds 5 --steps 800
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

import moekit
from moekit.models import MoEPlacementConfig, VisionMoE, VisionMoEConfig

D_MODEL, EXPERTS, EXPERT_HIDDEN, PATCHES = 64, 8, 128, 16
METHODS = ("token_choice", "expert_choice", "soft", "dense")


@register_flop_formula(torch.ops.aten._grouped_mm)
def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    # (M, K) rows times a stacked (E, K, N) weight: each row meets one expert's K x N matrix
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:  # (K, M) x (M, N) per group: weight gradient
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    raise NotImplementedError(f"grouped_mm flops for shapes {a_shape} x {b_shape}")


def config(method: str) -> VisionMoEConfig:
    if method == "dense":
        moe = MoEPlacementConfig()
    else:
        router = {
            "token_choice": moekit.RouterConfig(kind="top_k"),
            "expert_choice": moekit.RouterConfig(kind="expert_choice", capacity_factor=1.0),
            "soft": moekit.RouterConfig(kind="soft", slots_per_expert=PATCHES // EXPERTS),
        }[method]
        layer = moekit.MoEConfig(
            num_experts=EXPERTS,
            top_k=1,
            experts=moekit.ExpertConfig(hidden=EXPERT_HIDDEN, activation="gelu"),
            router=router,
            aux_loss=moekit.AuxLossConfig(switch=0.01 if method == "token_choice" else 0.0),
        )
        moe = MoEPlacementConfig(layer=layer, every=2)
    return VisionMoEConfig(
        image_size=8,
        patch_size=2,
        channels=1,
        num_classes=10,
        n_layers=4,
        n_heads=4,
        ffn_hidden=EXPERT_HIDDEN,
        moe=moe,
    )


def digits_splits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train / validation / test (60 / 20 / 20 %), the same split for every run."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n = len(order)
    cuts = {"train": order[: int(0.6 * n)], "val": order[int(0.6 * n) : int(0.8 * n)]}
    cuts["test"] = order[int(0.8 * n) :]
    return {name: (images[idx], labels[idx]) for name, idx in cuts.items()}


def flops_per_image(model: VisionMoE, batch: torch.Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(batch)
    return counter.get_total_flops() / len(batch)


def accuracy(model: VisionMoE, images: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():  # expert choice picks within a batch: evaluate at the training batch
        for start in range(0, len(labels), batch):
            logits = model(images[start : start + batch]).logits
            correct += int((logits.argmax(-1) == labels[start : start + batch]).sum())
    return correct / len(labels)


def train(method: str, lr: float, seed: int, data, steps: int, batch: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model = VisionMoE(config(method))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    images, labels = data["train"]
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        model.train()
        idx = torch.randint(0, len(labels), (batch,), generator=generator)
        out = model(images[idx])
        loss = F.cross_entropy(out.logits, labels[idx]) + out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    return {
        "val": accuracy(model, *data["val"], batch),
        "test": accuracy(model, *data["test"], batch),
        "train_seconds": seconds,
        "flops_per_image": flops_per_image(model, data["test"][0][:batch]),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--json", default=None, help="also write every run here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = digits_splits()
    runs = []
    for method in args.methods:
        for lr in args.lrs:
            for seed in range(args.seeds):
                run = {"method": method, "lr": lr, "seed": seed}
                run.update(train(method, lr, seed, data, args.steps, args.batch))
                runs.append(run)
                print(
                    json.dumps(
                        {k: round(v, 4) if isinstance(v, float) else v for k, v in run.items()}
                    ),
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    print(
        f"\n{args.steps} steps of batch {args.batch}, {args.seeds} seeds; lr picked on validation"
    )
    print("method          lr      test acc (mean ± sd)   val acc   MFLOPs/image   s/run  params")
    for method in args.methods:
        mine = [r for r in runs if r["method"] == method]
        best_lr = max(
            args.lrs, key=lambda lr: statistics.mean(r["val"] for r in mine if r["lr"] == lr)
        )
        best = [r for r in mine if r["lr"] == best_lr]
        tests = [r["test"] for r in best]
        spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
        print(
            f"{method:15s} {best_lr:<7g} {statistics.mean(tests):.4f} ± {spread:.4f}        "
            f"{statistics.mean(r['val'] for r in best):.4f}    "
            f"{best[0]['flops_per_image'] / 1e6:8.3f}     "
            f"{statistics.median(r['train_seconds'] for r in best):6.1f}  {best[0]['parameters']}"
        )


if __name__ == "__main__":
    main()
