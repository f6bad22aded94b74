"""``moekit adapter``: a PEFT LoRA adapter re-laid for another consumer, or merged."""

from __future__ import annotations

import argparse

HELP = (
    "Rewrite a PEFT LoRA adapter's expert factors in another layout (PEFT 0.19.1+, PEFT "
    "0.18.0-0.19.0, or per-expert modules for vLLM), or merge it into its base model."
)
LAYOUTS = ("peft", "peft-0.18", "per-expert")


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="a PEFT adapter folder (adapter_config.json, weights)")
    parser.add_argument("destination", help="the folder to write (replaced atomically)")
    parser.add_argument(
        "--base",
        required=True,
        metavar="HF_DIR",
        help="the Hugging Face folder of the adapter's base model (its family and widths)",
    )
    parser.add_argument(
        "--to",
        required=True,
        choices=(*LAYOUTS, "merged"),
        help="a layout, or 'merged': the base with every update added, as a Hugging Face folder",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.interop.adapter_layouts import (
        ExpertAdapterLayout,
        convert_adapter,
        detect_layout,
        merge_adapter,
        read_adapter,
        write_adapter,
    )
    from moekit.interop.hf import read_hf_config

    adapter = read_adapter(args.adapter)
    hf = read_hf_config(args.base)
    source = detect_layout(adapter, hidden_size=int(hf["hidden_size"]))
    if args.to != "merged":
        converted = convert_adapter(
            adapter, ExpertAdapterLayout(args.to), family=str(hf.get("model_type")), source=source
        )
        write_adapter(converted, args.destination)
        print(f"wrote {args.destination}: {source.value} -> {args.to}")
        return 0
    import transformers

    from moekit.training.tokenizer_files import copy_tokenizer, find_tokenizer_folder
    from moekit.utils.serialization import write_folder_atomically

    base = transformers.AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    base.load_state_dict(merge_adapter(base.state_dict(), adapter, layout=source))

    def write(staging):
        base.save_pretrained(staging)
        copy_tokenizer(find_tokenizer_folder(args.base), staging)

    write_folder_atomically(args.destination, write)
    print(f"wrote {args.destination}: {args.base} with the {source.value} adapter merged")
    return 0
