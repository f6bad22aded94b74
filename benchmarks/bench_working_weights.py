"""``moekit train`` under bf16: autocast casting the fp32 weights in every forward
(``working_weights=fp32``) against bf16 working copies kept between steps
(``working_weights=bf16``, the default wherever bf16 is on).

Both run ``moekit.training.train`` itself on the embedded corpus, the same model and seed, and
alternate round by round in one process; each round's figure is the loop's tokens/s (evaluation
and checkpoints excluded), and the ratio is the median of per-round ratios. The two give the
same losses to the bit (``tests/training/test_working_weights.py``), so only time differs.

    python benchmarks/bench_working_weights.py                      # CPU (needs native bf16)
    python benchmarks/bench_working_weights.py --grad-accum 4
    python benchmarks/bench_working_weights.py --device cuda --d-model 2048 --layers 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings

import torch

from moekit.training import load_train_config, train


def tokens_per_second(args: argparse.Namespace, working_weights: str) -> float:
    """One short ``moekit train`` run's loop throughput."""
    with tempfile.TemporaryDirectory() as out_dir:
        config = load_train_config(
            None,
            [
                f"device={args.device}",
                "bf16=true",
                f"working_weights={working_weights}",
                f"steps={args.steps}",
                f"eval_every={args.steps}",
                "eval_batches=1",
                f"log_every={args.steps}",
                f"data.seq_len={args.seq_len}",
                f"data.batch_size={args.batch_size}",
                f"optim.grad_accum={args.grad_accum}",
                f"model.d_model={args.d_model}",
                f"model.n_layers={args.layers}",
                f"model.ffn_hidden={4 * args.d_model}",
                f"model.max_seq_len={args.seq_len}",
                f"model.attention.n_heads={max(1, args.d_model // 64)}",
                f"model.moe.layer.num_experts={args.experts}",
                f"model.moe.layer.top_k={args.top_k}",
                f"model.moe.layer.experts.hidden={args.d_model}",
                f"out_dir={out_dir}",
            ],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = train(config, progress=False)
    return result.tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"device {args.device} ({torch.backends.cpu.get_cpu_capability()} CPU), d_model "
        f"{args.d_model}, {args.layers} layers, {args.experts} experts top-{args.top_k}, batch "
        f"{args.batch_size} x {args.seq_len}, grad_accum {args.grad_accum}, {args.steps} steps a "
        "round; tokens/s"
    )
    tokens_per_second(args, "bf16")  # warm-up: allocator, kernels, corpus read
    ratios = []
    for round_ in range(args.rounds):
        autocast = tokens_per_second(args, "fp32")
        working = tokens_per_second(args, "bf16")
        ratios.append(working / autocast)
        print(
            f"round {round_}: autocast (fp32 weights) {autocast:,.0f}   bf16 working weights "
            f"{working:,.0f}   ratio {working / autocast:.3f}"
        )
    print(f"median ratio, working weights / autocast: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
