"""``moekit upcycle``: a dense checkpoint -> an MoE checkpoint that starts where it was."""

from __future__ import annotations

import argparse

HELP = (
    "Sparse upcycling (Komatsuzaki et al. 2022): turn a dense moekit or Hugging Face "
    "(Llama/Mistral/Qwen2) checkpoint into an MoE whose experts start as copies of each FFN."
)


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="dense checkpoint folder (moekit or Hugging Face)")
    parser.add_argument("destination", help="output folder")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token")
    parser.add_argument("--every", type=int, default=1, help="an MoE in every n-th block")
    parser.add_argument(
        "--noise", type=float, default=0.0, help="relative noise added to each expert copy"
    )
    parser.add_argument(
        "--granularity", type=int, default=1, help="split each FFN into this many finer experts"
    )
    parser.add_argument(
        "--export", default="moekit", help="'moekit' or an HF family to write (e.g. mixtral)"
    )
    parser.add_argument("--seed", type=int, default=0, help="router initialisation seed")


def run(args: argparse.Namespace) -> int:
    from moekit.cli.convert import carry_tokenizer, load_any, save_any
    from moekit.training.upcycle import upcycle

    model = upcycle(
        load_any(args.source),
        args.experts,
        args.top_k,
        every=args.every,
        noise_std=args.noise,
        granularity=args.granularity,
        seed=args.seed,
    )
    save_any(model, args.destination, args.export)
    carry_tokenizer(args.source, args.destination)
    print(f"wrote {args.destination}: {args.experts} experts, top-{args.top_k} ({args.export})")
    return 0
