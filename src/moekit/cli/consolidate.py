"""``moekit consolidate``: a sharded (multi-rank) checkpoint -> one ``model.safetensors``."""

from __future__ import annotations

import argparse

HELP = (
    "Write a sharded checkpoint (every rank's part, from a run on a data × expert mesh) as a "
    "single-folder checkpoint with one model.safetensors, one tensor at a time; moekit convert "
    "then exports it to a Hugging Face family."
)


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run folder (its latest checkpoint) or a checkpoint")
    parser.add_argument("destination", help="output folder (config.json + model.safetensors)")


def run(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from moekit.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE
    from moekit.models.sharded_checkpoint import consolidate, is_sharded
    from moekit.training.checkpoint import resolve_checkpoint
    from moekit.training.tokenizer_files import copy_tokenizer, find_tokenizer_folder
    from moekit.utils.serialization import add_checksums, write_folder_atomically

    source = resolve_checkpoint(args.checkpoint)
    if not is_sharded(source):
        raise ValueError(f"{source} is not a sharded checkpoint (it has no sharded/.metadata)")

    def write(folder: Path) -> None:
        shutil.copy2(source / CONFIG_FILE, folder / CONFIG_FILE)
        consolidate(source, folder / WEIGHTS_FILE)
        add_checksums(folder, [WEIGHTS_FILE])
        copy_tokenizer(find_tokenizer_folder(args.checkpoint), folder)

    out = write_folder_atomically(args.destination, write)
    print(f"wrote {out / WEIGHTS_FILE} from {source}")
    return 0
