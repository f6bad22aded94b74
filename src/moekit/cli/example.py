"""``moekit example``: a short MoE-vs-dense run on a task made of local sub-problems.

The data follow the 1991 "Adaptive Mixtures of Local Experts" setting: inputs come from C
clusters and each cluster has its own nonlinear target map. An MoE layer (E experts, top-k) and
a dense FFN with the same active parameters per token are trained with the same data, steps,
optimizer and seed; the run prints both losses and which experts each cluster uses.
"""

from __future__ import annotations

import argparse
import time
from typing import cast

import torch

import moekit
from moekit.experts.activations import Activation
from moekit.utils.progress import progress_bar

HELP = "Train a small MoE layer and a dense FFN with equal active parameters on a toy task."


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--batch", type=int, default=512, help="tokens per step")
    parser.add_argument("--d-model", type=int, default=32, help="model width")
    parser.add_argument("--experts", type=int, default=8, help="routed experts E")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token k")
    parser.add_argument("--expert-hidden", type=int, default=32, help="hidden width per expert")
    parser.add_argument("--clusters", type=int, default=8, help="sub-problems in the data")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


class _ClusterTask:
    """Inputs near one of C centres; the target is that centre's own map ``tanh(x A_c) B_c``."""

    def __init__(self, d_model: int, clusters: int, generator: torch.Generator) -> None:
        self.centres = torch.randn(clusters, d_model, generator=generator) * 2.0
        self.maps_in = torch.randn(clusters, d_model, d_model, generator=generator) / d_model**0.5
        self.maps_out = torch.randn(clusters, d_model, d_model, generator=generator) / d_model**0.5
        self.generator = generator

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = torch.randint(0, len(self.centres), (n,), generator=self.generator)
        x = self.centres[c] + torch.randn(n, self.centres.shape[1], generator=self.generator)
        h = torch.tanh(torch.einsum("nd,nde->ne", x, self.maps_in[c]))
        y = torch.einsum("nd,nde->ne", h, self.maps_out[c])
        return x, y, c


def _train(model, forward, task, steps, batch, lr, desc, show_progress=True):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    start = time.perf_counter()
    for _ in progress_bar(range(steps), desc=desc, enabled=show_progress):
        x, y, _ = task.sample(batch)
        pred, aux = forward(x)
        loss = torch.nn.functional.mse_loss(pred, y)
        optimizer.zero_grad(set_to_none=False)
        (loss + aux).backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    d, E, k, h = args.d_model, args.experts, args.top_k, args.expert_hidden
    moe = moekit.MoEConfig(
        num_experts=E,
        top_k=k,
        experts=moekit.ExpertConfig(hidden=h, activation=Activation.SWIGLU),
        aux_loss=moekit.AuxLossConfig(switch=0.01),
    ).build(d_model=d)
    dense = moekit.FeedForward(
        d, k * h, activation=Activation.SWIGLU
    )  # same active parameters per token

    def moe_forward(x):
        out = moe(x)
        return out.output, out.aux_loss

    def dense_forward(x):
        return dense(x), 0.0

    results = {}
    for name, model, forward in (("moe", moe, moe_forward), ("dense", dense, dense_forward)):
        task = _ClusterTask(d, args.clusters, torch.Generator().manual_seed(args.seed))
        results[name] = _train(
            model, forward, task, args.steps, args.batch, args.lr, name, not args.quiet
        )

    eval_task = _ClusterTask(d, args.clusters, torch.Generator().manual_seed(args.seed))
    eval_task.generator.manual_seed(args.seed + 1)
    x, y, c = eval_task.sample(4096)
    with torch.no_grad():
        moe.eval()
        out = moe(x)
        eval_moe = torch.nn.functional.mse_loss(out.output, y).item()
        eval_dense = torch.nn.functional.mse_loss(dense(x), y).item()

    total = sum(p.numel() for p in moe.parameters())
    bank = cast(moekit.ExpertBank, moe.experts)
    active = sum(p.numel() for p in moe.router.parameters()) + k * (
        bank.w_in_EDH[0].numel() + bank.w_out_EHD[0].numel()
    )
    dense_params = sum(p.numel() for p in dense.parameters())
    print(f"\nTask: {args.clusters} clusters, each with its own target map; d_model={d}.")
    print(f"{'model':<8}{'total params':>14}{'active/token':>14}{'eval MSE':>11}{'train s':>9}")
    print(f"{'moe':<8}{total:>14,}{active:>14,}{eval_moe:>11.4f}{results['moe'][1]:>9.1f}")
    print(
        f"{'dense':<8}{dense_params:>14,}{dense_params:>14,}{eval_dense:>11.4f}"
        f"{results['dense'][1]:>9.1f}"
    )
    stats = out.stats
    assert stats is not None  # the example keeps statistics on
    print(f"\nMoE routing on held-out data: router entropy {float(stats.router_entropy):.3f} nats")
    print("tokens per expert: " + " ".join(str(n) for n in stats.tokens_per_expert.tolist()))
    print("most-used expert per cluster (share of the cluster's top-1 choices):")
    top1 = out.routing.expert_idx_TK[:, 0]
    for cluster in range(args.clusters):
        choices = torch.bincount(top1[c == cluster], minlength=E)
        best = int(choices.argmax())
        share = float(choices[best]) / max(int(choices.sum()), 1)
        print(f"  cluster {cluster}: expert {best} ({share:.0%})")
    return 0
