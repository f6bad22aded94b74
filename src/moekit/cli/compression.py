"""What ``moekit prune`` and ``moekit merge`` share: arguments, calibration data, writing."""

from __future__ import annotations

import argparse


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a moekit run or checkpoint folder, or a Hugging Face folder")
    parser.add_argument("destination", help="output folder")
    parser.add_argument("--fraction", type=float, default=0.25, help="share of experts removed")
    parser.add_argument("--data", default=None, help="calibration text (default: embedded)")
    parser.add_argument("--batches", type=int, default=8, help="calibration batches")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per batch")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    parser.add_argument(
        "--export", default="moekit", help="'moekit' or an HF family to write (e.g. mixtral)"
    )


def check_calibration_sizes(args: argparse.Namespace) -> None:
    """Refuse ``--batches``, ``--batch-size`` or ``--seq-len`` below 1, by flag."""
    for name in ("batches", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be >= 1, got {getattr(args, name)}")


def load_with_calibration(args: argparse.Namespace):
    check_calibration_sizes(args)
    from moekit.training.data import calibration_batches
    from moekit.training.finetune import load_source
    from moekit.training.tokenizer_files import resolve_tokenizer

    model = load_source(args.model)
    tokenizer = resolve_tokenizer(args.model, model.config.vocab_size)
    seq_len = min(args.seq_len, model.config.max_seq_len)
    return model, calibration_batches(args.data, tokenizer, args.batches, args.batch_size, seq_len)


def write_result(model, args: argparse.Namespace) -> None:
    from moekit.cli.convert import save_any
    from moekit.layers.switches import moe_layers

    save_any(model, args.destination, args.export)
    counts = [layer.num_experts for layer in moe_layers(model)]
    print(f"wrote {args.destination} ({args.export}): experts per MoE layer {counts}")
