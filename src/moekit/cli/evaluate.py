"""``moekit eval``: validation loss and perplexity of a checkpoint on given text."""

from __future__ import annotations

import argparse
import math

HELP = "Validation loss (nats per byte or token) and perplexity of a model on text."


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="a checkpoint folder, a run folder (uses latest) or a Hugging Face folder; a model "
        "trained with a Hugging Face tokenizer is evaluated with it",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="text file, folder or JSON-lines file; all of it is evaluated "
        "(default: the validation split of the standard-library corpus)",
    )
    parser.add_argument("--batches", type=int, default=16, help="evaluation batches")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sequence (default: the model's max_seq_len)",
    )


def _tokenizer_folder(path: str) -> str | None:
    """The Hugging Face tokenizer a model was trained with: the folder itself for an HF model,
    the run's ``data.tokenizer`` for a run or checkpoint (``None``: bytes)."""
    import json
    from pathlib import Path

    from moekit.training.checkpoint import STATE_FILE, resolve_checkpoint
    from moekit.training.finetune import is_hf_folder

    if is_hf_folder(Path(path)):
        return path
    state = resolve_checkpoint(path) / STATE_FILE
    if state.is_file():
        data = json.loads(state.read_text()).get("train_config", {}).get("data", {})
        return data.get("tokenizer")
    return None


def run(args: argparse.Namespace) -> int:
    from moekit.training.data import (
        DataConfig,
        TokenStream,
        load_corpus,
        load_tokenizer,
        read_documents,
    )
    from moekit.training.finetune import load_source
    from moekit.training.loop import evaluate

    model = load_source(args.checkpoint)
    seq_len = args.seq_len or model.config.max_seq_len
    tokenizer_folder = _tokenizer_folder(args.checkpoint)
    if args.data is None:
        _, stream = load_corpus(DataConfig(seq_len=seq_len, tokenizer=tokenizer_folder))
    else:
        stream = TokenStream(read_documents(args.data), load_tokenizer(tokenizer_folder))
    loss = evaluate(model, stream, args.batches, args.batch_size, seq_len)
    unit = "byte" if tokenizer_folder is None else "token"
    print(
        f"validation loss {loss:.4f} nats/{unit}, perplexity {math.exp(loss):.3f}, "
        f"{loss / math.log(2):.4f} bits/{unit}"
    )
    return 0
