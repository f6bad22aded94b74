"""``moekit inspect``: what the routers of a model do on some data, as report.html/json."""

from __future__ import annotations

import argparse

HELP = (
    "Per-layer expert load as percentiles, dead experts, router entropy, routing margins, drops "
    "at a capacity factor, co-activation, agreement between layers and which tokens each "
    "expert takes, how concentrated routing is (the hot set an expert cache would keep), over "
    "a data stream; --compare reports routing differences."
)


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a moekit run or checkpoint folder, or a Hugging Face folder")
    parser.add_argument(
        "--data", default=None, help="text, folder or JSON lines (default: embedded)"
    )
    parser.add_argument("--batches", type=int, default=16, help="batches to stream")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per batch")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    parser.add_argument(
        "--capacity-factor",
        type=float,
        default=1.25,
        help="capacity factor for the dropped-token figures",
    )
    parser.add_argument("--out", default="reports/inspect", help="report.html and report.json")
    compare = parser.add_mutually_exclusive_group()
    compare.add_argument("--compare", default=None, metavar="MODEL", help="a second model")
    compare.add_argument(
        "--compare-dtype",
        default=None,
        choices=("bfloat16", "float16"),
        help="the same model in this dtype",
    )
    compare.add_argument(
        "--compare-batching", action="store_true", help="each sequence alone vs in the batch"
    )
    parser.add_argument(
        "--expert-budget",
        action="append",
        default=None,
        metavar="SIZE",
        help="report the expert-cache hit rate batch-1 decoding would get with SIZE of experts "
        "in memory (64KB, 512MB, 2GB, 512MiB; repeatable; default: 10%%, 25%%, 50%% of them)",
    )
    parser.add_argument(
        "--counterfactual",
        action="store_true",
        help="per layer, the loss change if each token's k-th expert were swapped for the "
        "router's (k+1)-th (one extra forward per layer and batch)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import copy

    import torch

    from moekit.analysis.inspect import inspect_model, routing_differences
    from moekit.analysis.inspect_report import hot_set_lines, write_inspect_report
    from moekit.cli.compression import check_calibration_sizes
    from moekit.experts.offload import parse_bytes
    from moekit.training.data import calibration_batches
    from moekit.training.finetune import load_source
    from moekit.training.tokenizer_files import resolve_tokenizer
    from moekit.utils.progress import progress_bar

    check_calibration_sizes(args)  # 0 batches reported every expert dead, with exit 0
    budgets = [parse_bytes(b) for b in args.expert_budget] if args.expert_budget else None
    model = load_source(args.model)
    tokenizer = resolve_tokenizer(args.model, model.config.vocab_size)
    seq_len = min(args.seq_len, model.config.max_seq_len)
    batches = calibration_batches(args.data, tokenizer, args.batches, args.batch_size, seq_len)

    def decode(token: int) -> str:
        return tokenizer.decode([token])

    report = inspect_model(
        model,
        batches,
        vocab_size=model.config.vocab_size,
        capacity_factor=args.capacity_factor,
        decode=decode,
        progress=lambda b: progress_bar(b, desc="inspect", enabled=not args.quiet),
        budgets_bytes=budgets,
    )
    other = None
    if args.compare is not None:
        other = load_source(args.compare)
    elif args.compare_dtype is not None:
        other = copy.deepcopy(model).to(getattr(torch, args.compare_dtype))
    if other is not None or args.compare_batching:
        report["differences"] = routing_differences(
            model,
            other if other is not None else model,
            batches,
            per_sequence=args.compare_batching,
        )
    if args.counterfactual:
        from moekit.analysis.counterfactual import counterfactual_routing

        report["counterfactual"] = counterfactual_routing(model, batches)
    path = write_inspect_report(report, args.out, f"moekit inspect: {args.model}")
    for layer in report["layers"]:
        load = layer["load_fraction_of_ideal"]
        print(
            f"{layer['name']}: load p5 {load['p5']:.2f} p50 {load['p50']:.2f} p95 "
            f"{load['p95']:.2f} max {load['max']:.2f} (x ideal), dead {layer['dead_experts']}, "
            f"entropy {layer['router_entropy']:.3f}/{layer['max_entropy']:.3f}"
        )
    for line in hot_set_lines(report["hot_set"]) if "hot_set" in report else []:
        print(line)
    for c in report.get("counterfactual", []):
        print(
            f"{c['layer']}: swapping the k-th expert for the next-best changes the loss by "
            f"{c['mean_loss_change']:+.4f} nats/token; {c['better_fraction']:.1%} of tokens do "
            f"better (by {c['mean_gain_when_better']:.4f})"
        )
    for d in report.get("differences", []):
        print(f"{d['layer']}: {d['differing_fraction']:.2%} of tokens take other experts")
    print(f"wrote {path} and report.json")
    return 0
