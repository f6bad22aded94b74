"""``moekit convert``: Hugging Face checkpoint folders <-> moekit checkpoints."""

from __future__ import annotations

import argparse

from moekit.interop.hf import FAMILIES, SEQ2SEQ_FAMILIES

HELP = (
    "Convert a local Hugging Face checkpoint (any family of `--to`'s list) to a moekit "
    "checkpoint, or a moekit checkpoint to a Hugging Face family."
)


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="checkpoint folder (config.json + *.safetensors)")
    parser.add_argument("destination", help="output folder (replaced atomically)")
    parser.add_argument(
        "--to",
        default="moekit",
        choices=["moekit", *FAMILIES, *SEQ2SEQ_FAMILIES],
        metavar="FAMILY",
        help="'moekit', or an HF family: " + ", ".join([*FAMILIES, *SEQ2SEQ_FAMILIES]),
    )


def load_any(path: str):
    """A moekit ``TransformerLM`` from a moekit run or checkpoint folder or a Hugging Face
    folder (``moekit.training.finetune.load_source``)."""
    from moekit.training.finetune import load_source

    return load_source(path)


def save_any(model, destination: str, target: str) -> None:
    """Write ``model`` as a moekit checkpoint (``target='moekit'``) or an HF family folder."""
    from moekit.interop.hf import to_hf
    from moekit.models.checkpoint import save_pretrained

    if target == "moekit":
        save_pretrained(model, destination)
    else:
        to_hf(model, destination, target)


def carry_tokenizer(source: str, destination: str) -> None:
    """Copy the tokenizer of the model at ``source`` (if it has one) into ``destination``."""
    from moekit.training.tokenizer_files import copy_tokenizer, find_tokenizer_folder

    copy_tokenizer(find_tokenizer_folder(source), destination)


def run(args: argparse.Namespace) -> int:
    save_any(load_any(args.source), args.destination, args.to)
    carry_tokenizer(args.source, args.destination)
    print(f"wrote {args.destination} ({args.to})")
    return 0
