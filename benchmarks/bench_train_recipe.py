"""``moekit train``'s speed options, each against its off setting, through the training loop
itself (``moekit.training.train`` on the embedded corpus, the same model and seed):

- ``working_weights``: bf16 working copies of the matrix weights kept between steps (``bf16``,
  the default wherever bf16 is on) against autocast casting the fp32 weights in every forward
  (``fp32``); bf16 on. The two give the same losses to the bit
  (``tests/training/test_working_weights.py``), so only time differs.
- ``compile``: ``torch.compile`` of each block's token mixer and dense feed-forward (``dense``)
  against eager (``eager``), in the precision ``--bf16`` picks.

The settings alternate round by round in one process; a round's figure is the median of its
steps' tokens/s after ``--skip`` steps (compilation, warm-up), and the ratio is the median of
per-round ratios.

    python benchmarks/bench_train_recipe.py                          # working weights, CPU
    python benchmarks/bench_train_recipe.py --grad-accum 4
    python benchmarks/bench_train_recipe.py --option compile --no-bf16
    python benchmarks/bench_train_recipe.py --device cuda --d-model 2048 --layers 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings

import torch

from moekit.training import load_train_config, train

SETTINGS = {"working_weights": ("fp32", "bf16"), "compile": ("eager", "dense")}


def tokens_per_second(args: argparse.Namespace, setting: str) -> float:
    """One short ``moekit train`` run: the median tokens/s of its steps after ``args.skip``."""
    with tempfile.TemporaryDirectory() as out_dir:
        config = load_train_config(
            None,
            [
                f"device={args.device}",
                f"bf16={str(args.bf16).lower()}",
                f"{args.option}={setting}",
                f"steps={args.steps}",
                f"eval_every={args.steps}",
                "eval_batches=1",
                "log_every=1",
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
                f"model.moe.every={args.moe_every}",
                f"out_dir={out_dir}",
            ],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = train(config, progress=False)
    return statistics.median(r["tokens_per_second"] for r in result.records[args.skip :])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--option", choices=sorted(SETTINGS), default="working_weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=2, help="steps not timed in each run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--moe-every", type=int, default=1, help="an MoE layer every n blocks")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    args = parser.parse_args(argv)
    if args.option == "working_weights" and not args.bf16:
        parser.error("--option working_weights compares bf16 recipes: drop --no-bf16")
    torch.set_num_threads(args.threads)
    off, on = SETTINGS[args.option]
    print(
        f"{args.option}: {on} against {off}; device {args.device} "
        f"({torch.backends.cpu.get_cpu_capability()} CPU), bf16 {args.bf16}, d_model "
        f"{args.d_model}, {args.layers} layers (MoE every {args.moe_every}), {args.experts} "
        f"experts top-{args.top_k}, batch {args.batch_size} x {args.seq_len}, grad_accum "
        f"{args.grad_accum}, {args.steps} steps a run ({args.skip} not timed); tokens/s"
    )
    tokens_per_second(args, on)  # warm-up: allocator, kernels, corpus read
    ratios = []
    for round_ in range(args.rounds):
        base, option = tokens_per_second(args, off), tokens_per_second(args, on)
        ratios.append(option / base)
        print(f"round {round_}: {off} {base:,.0f}   {on} {option:,.0f}   ratio {option / base:.3f}")
    print(f"median ratio, {on} / {off}: {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
