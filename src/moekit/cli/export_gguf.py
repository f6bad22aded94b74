"""``moekit export-gguf``: a model as a GGUF file for llama.cpp, Ollama and LM Studio."""

from __future__ import annotations

import argparse

from moekit.interop.gguf_export import GGUF_ARCHS, GGUF_TYPES

HELP = (
    "Write a moekit run or a Hugging Face folder as one GGUF file llama.cpp runs (the metadata "
    "and tensor names of llama.cpp's own converter, the tokenizer included)."
)


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a moekit run or checkpoint folder, or a Hugging Face folder")
    parser.add_argument("destination", help="the .gguf file to write (replaced atomically)")
    parser.add_argument(
        "--type",
        default="f16",
        metavar="TYPE",
        help="weight type of the matrices: " + ", ".join(GGUF_TYPES) + " (K-quants: export "
        "q8_0 or f16, then llama.cpp's llama-quantize)",
    )
    parser.add_argument(
        "--family",
        default="auto",
        choices=["auto", *GGUF_ARCHS],
        help="the Hugging Face family whose llama.cpp architecture to write; 'auto': the "
        "first that runs the model",
    )


def run(args: argparse.Namespace) -> int:
    from moekit.adapters.lora import lora_parameters, remove_lora
    from moekit.interop.gguf_export import check_type, choose_family, export_gguf
    from moekit.models.transformer.model import TransformerLM
    from moekit.training.finetune import load_source
    from moekit.training.tokenizer_files import find_tokenizer_folder

    file_type = check_type(args.type)  # before loading: a typo costs nothing
    model = load_source(args.model)
    if not isinstance(model, TransformerLM):
        raise ValueError(
            f"{args.model}: GGUF export writes decoder-only models; this one is "
            f"a {type(model).__name__}"
        )
    if lora_parameters(model):  # a LoRA run: llama.cpp gets the merged weights
        remove_lora(model)
    family = choose_family(model) if args.family == "auto" else args.family
    tokenizer = find_tokenizer_folder(args.model)
    path = export_gguf(
        model, args.destination, family=family, file_type=file_type, tokenizer_folder=tokenizer
    )
    size = path.stat().st_size / 2**20
    print(
        f"wrote {path}: llama.cpp {GGUF_ARCHS[family].name} ({family}), {file_type}, {size:.2f} MiB"
    )
    return 0
