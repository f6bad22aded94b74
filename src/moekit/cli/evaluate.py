"""``moekit eval``: validation loss and perplexity of a checkpoint on given text."""

from __future__ import annotations

import argparse
import math
from typing import cast

HELP = "Validation loss (nats per byte) and perplexity of a checkpoint on text."


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint folder, or a run folder (uses latest)")
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


def run(args: argparse.Namespace) -> int:
    from moekit.models.checkpoint import from_pretrained
    from moekit.models.transformer.model import TransformerLM
    from moekit.training.checkpoint import resolve_checkpoint
    from moekit.training.data import (
        ByteTokenizer,
        DataConfig,
        TokenStream,
        load_corpus,
        read_documents,
    )
    from moekit.training.loop import evaluate

    model = cast(TransformerLM, from_pretrained(resolve_checkpoint(args.checkpoint)))
    seq_len = args.seq_len or model.config.max_seq_len
    if args.data is None:
        _, stream = load_corpus(DataConfig(seq_len=seq_len))
    else:
        stream = TokenStream(read_documents(args.data), ByteTokenizer())
    loss = evaluate(model, stream, args.batches, args.batch_size, seq_len)
    print(
        f"validation loss {loss:.4f} nats/byte, perplexity {math.exp(loss):.3f}, "
        f"{loss / math.log(2):.4f} bits/byte"
    )
    return 0
