"""Cost of every router family on the same MoE layer, relative to token-choice top-2.

Layer: fp32, d_model 256, expert hidden 512 (SwiGLU), 8 experts, 16 sequences of 256 tokens,
training mode, forward+backward. Routers run alternately in one process; the table reports the
median over rounds of time(router) / time(top-2) and the mean experts computed per token.

    python benchmarks/bench_routers.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import moekit

D_MODEL, HIDDEN, EXPERTS, BATCH, SEQ = 256, 512, 8, 16, 256

ROUTERS = {
    "top_k (k=2)": (dict(kind="top_k"), 2),
    "switch (top_k, k=1)": (dict(kind="top_k", normalize_weights=False), 1),
    "noisy top-2 (Shazeer)": (dict(kind="top_k", gating="topk_softmax", noisy_gating=True), 2),
    "sigmoid grouped + bias (DeepSeek-V3)": (
        dict(kind="top_k", gating="sigmoid_topk", num_groups=4, topk_groups=2, bias_balancing=True),
        2,
    ),
    "dense (all experts)": (dict(kind="dense"), 1),
    "dense, Eigen 2013 gate": (dict(kind="dense", gate_hidden=64), 1),
    "gshard_top2": (dict(kind="gshard_top2"), 2),
    "expert_choice (c=2)": (dict(kind="expert_choice", capacity_factor=2.0), 1),
    "soft (2 x tokens / E slots)": (dict(kind="soft", slots_per_expert=2 * SEQ // EXPERTS), 1),
    "hash": (dict(kind="hash"), 1),
    "random_static": (dict(kind="random_static", vocab_size=1000), 1),
    "base (Sinkhorn)": (dict(kind="base", exact_assignment_max_tokens=0), 1),
    "top_p (p=0.5, k<=4)": (dict(kind="top_p", top_p=0.5), 4),
}


def build(name: str) -> moekit.MoE:
    torch.manual_seed(0)
    options, top_k = ROUTERS[name]
    return moekit.MoEConfig(
        num_experts=EXPERTS,
        top_k=top_k,
        experts=moekit.ExpertConfig(hidden=HIDDEN),
        router=moekit.RouterConfig(**options),
    ).build(d_model=D_MODEL)


def step(moe: moekit.MoE, x: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
    moe.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = moe(x, token_ids=ids)
    (out.output.square().mean() + out.aux_loss).backward()
    return time.perf_counter() - start, float(out.stats.experts_per_token)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers = {name: build(name) for name in ROUTERS}
    x = torch.randn(BATCH, SEQ, D_MODEL)
    ids = torch.randint(0, 1000, (BATCH, SEQ))
    for moe in layers.values():
        step(moe, x, ids)  # warm-up
    times = {name: [] for name in ROUTERS}
    experts = {}
    for _ in range(args.rounds):
        for name, moe in layers.items():
            t, k = step(moe, x, ids)
            times[name].append(t)
            experts[name] = k
    base = times["top_k (k=2)"]
    print(
        f"torch {torch.__version__}, {args.threads} threads; {BATCH}x{SEQ} tokens, "
        f"d_model {D_MODEL}, {EXPERTS} experts of hidden {HIDDEN}; fwd+bwd, train mode"
    )
    print(f"{'router':<40}{'experts/token':>14}{'ms':>9}{'vs top-2':>10}")
    for name in ROUTERS:
        ratio = statistics.median(a / b for a, b in zip(times[name], base, strict=True))
        print(
            f"{name:<40}{experts[name]:>14.2f}{1000 * statistics.median(times[name]):>9.1f}"
            f"{ratio:>10.2f}"
        )


if __name__ == "__main__":
    main()
