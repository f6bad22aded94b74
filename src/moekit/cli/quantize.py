"""``moekit quantize``: store a model's routed experts in int8, int4 or MXFP4."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HELP = (
    "Quantise the routed experts' weights (int8 or int4 with group-wise scales, or MXFP4) and "
    "write a moekit checkpoint that eval, generate, inspect and finetune (QLoRA) load as any."
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a moekit run or checkpoint folder, or a Hugging Face folder")
    parser.add_argument("destination", help="output folder (a moekit checkpoint)")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4, help="bits per weight")
    parser.add_argument(
        "--format",
        choices=("int", "mxfp4"),
        default="int",
        help="'int': symmetric integers with a float32 scale per group; 'mxfp4': OCP MX FP4 "
        "with a power-of-two scale per 32 values (needs --bits 4)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="input values per scale; must divide d_model and the expert width "
        "(default: 128 for int, 32 for mxfp4)",
    )


def run(args: argparse.Namespace) -> int:
    from moekit.experts.quantized import QuantFormat, QuantizationConfig
    from moekit.models.checkpoint import save_pretrained
    from moekit.training.finetune import is_hf_folder, load_source
    from moekit.training.quantize import expert_weight_bytes, quantize_experts

    if args.format == "mxfp4" and args.bits != 4:
        raise ValueError(f"--format mxfp4 stores 4 bits per weight, got --bits {args.bits}")
    fmt = "mxfp4" if args.format == "mxfp4" else f"int{args.bits}"
    group = args.group_size or (32 if fmt == "mxfp4" else 128)
    quantization = QuantizationConfig(format=QuantFormat(fmt), group_size=group)
    model = load_source(args.model)
    before = expert_weight_bytes(model)
    quantize_experts(model, quantization)
    after = expert_weight_bytes(model)
    save_pretrained(model, args.destination)
    source = Path(args.model)
    if is_hf_folder(source):  # keep the tokenizer beside the weights
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, Path(args.destination) / name)
    print(
        f"wrote {args.destination}: experts {fmt}, group size {group}, "
        f"{before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB "
        f"({before / max(after, 1):.1f}x smaller)"
    )
    return 0
