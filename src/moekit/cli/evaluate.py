"""``moekit eval``: validation loss and perplexity of a model on held-out text."""

from __future__ import annotations

import argparse
import math
import sys

HELP = "Validation loss (nats per byte or token) and perplexity of a model on held-out text."


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="a run folder (uses its latest checkpoint), a checkpoint folder, "
        "checkpoints/latest, or a Hugging Face folder; the model's own tokenizer is used",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="text file, folder or JSON-lines file to score (default: the run's own validation "
        "split, or the standard-library corpus's for a model without a run)",
    )
    parser.add_argument(
        "--batches",
        type=int,
        default=16,
        help="batches of windows to score: --batches × --batch-size windows of --seq-len "
        "tokens, spread evenly over the text",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="windows per batch")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per window (default: the model's max_seq_len)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="FOLDER",
        help="a Hugging Face tokenizer folder, or 'bytes' (default: the one saved with the model)",
    )


def _default_text(path: str) -> tuple[str | None, float, str]:
    """``(data.path, val_fraction, description)`` of the text a run held out for validation."""
    import json
    from pathlib import Path

    from moekit.training.data import DataConfig
    from moekit.training.tokenizer_files import STATE_FILE, _model_folder

    model = _model_folder(Path(path))
    defaults = DataConfig()
    if model is not None and (model / STATE_FILE).is_file():
        state = json.loads((model / STATE_FILE).read_text())
        data = state.get("train_config", {}).get("data", {})
        if not data.get("instruction") and (
            data.get("path") is None or Path(data["path"]).exists()
        ):
            where = data.get("path") or "the standard-library corpus"
            fraction = data.get("val_fraction", defaults.val_fraction)
            return data.get("path"), fraction, f"the run's validation split of {where}"
    return None, defaults.val_fraction, "the standard-library corpus's validation split"


def run(args: argparse.Namespace) -> int:
    from moekit.training.data import TokenStream, read_documents, split_documents
    from moekit.training.finetune import load_source
    from moekit.training.loop import evaluate
    from moekit.training.tokenizer_files import resolve_tokenizer, tokenizer_label

    for name in ("batches", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model = load_source(args.checkpoint)
    seq_len = args.seq_len or model.config.max_seq_len
    if not 1 <= seq_len <= model.config.max_seq_len:
        raise ValueError(
            f"--seq-len must be in [1, {model.config.max_seq_len}] (the model's max_seq_len), "
            f"got {seq_len}"
        )
    tokenizer = resolve_tokenizer(args.checkpoint, model.config.vocab_size, args.tokenizer)
    if args.data is None:
        path, fraction, what = _default_text(args.checkpoint)
        docs = split_documents(read_documents(path), fraction)[1]
    else:
        docs, what = read_documents(args.data), args.data
    stream = TokenStream(docs, tokenizer)
    loss = evaluate(model, stream, args.batches, args.batch_size, seq_len)
    unit = tokenizer_label(tokenizer)
    windows = args.batches * args.batch_size
    print(
        f"scored {windows} windows of {seq_len} {unit}s from {what} "
        f"({len(stream):,} {unit}s in all)",
        file=sys.stderr,
    )
    print(
        f"validation loss {loss:.4f} nats/{unit}, perplexity {math.exp(loss):.3f}, "
        f"{loss / math.log(2):.4f} bits/{unit}"
    )
    return 0
