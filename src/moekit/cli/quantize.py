"""``moekit quantize``: store a model's routed experts in int8, int4 or MXFP4."""

from __future__ import annotations

import argparse

HELP = (
    "Quantise the routed experts' weights (int8 or int4 with group-wise scales, or MXFP4) and "
    "write a moekit checkpoint that eval, generate, inspect and finetune (QLoRA) load as any."
)


def default_group_size(model, fmt: str) -> int:
    """The largest group size up to the format's default (128 for int, 32 for MXFP4) that
    divides every quantised width (d_model and each expert width), said on stderr when it is
    not the default. MXFP4's block is 32 by definition: its widths must be multiples of 32."""
    import math
    import sys

    from moekit.experts.bank import ExpertBank

    widths = {model.config.d_model}
    widths |= {m.w_out_EHD.shape[1] for m in model.modules() if isinstance(m, ExpertBank)}
    common = 0
    for width in widths:
        common = math.gcd(common, width)
    default = 32 if fmt == "mxfp4" else 128
    if fmt == "mxfp4":
        if common % 32:
            raise ValueError(
                f"--format mxfp4 stores blocks of 32 values, but the widths {sorted(widths)} are "
                "not all multiples of 32: use --format int"
            )
        return 32
    group = max(g for g in range(1, default + 1) if common % g == 0)
    if group != default:
        print(
            f"group size {group}: the largest that divides every width {sorted(widths)} "
            f"(the default {default} does not)",
            file=sys.stderr,
        )
    return group


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
    import sys

    from moekit.adapters.lora import lora_parameters, remove_lora
    from moekit.cli.convert import carry_tokenizer
    from moekit.experts.quantized import QuantFormat, QuantizationConfig
    from moekit.models.checkpoint import save_pretrained
    from moekit.training.finetune import load_source
    from moekit.training.quantize import expert_weight_bytes, quantize_experts

    if args.format == "mxfp4" and args.bits != 4:
        raise ValueError(f"--format mxfp4 stores 4 bits per weight, got --bits {args.bits}")
    fmt = "mxfp4" if args.format == "mxfp4" else f"int{args.bits}"
    if args.group_size is not None and args.group_size < 1:
        raise ValueError(f"--group-size must be >= 1, got {args.group_size}")
    model = load_source(args.model)
    if lora_parameters(model):  # a LoRA run: its adapters become part of what is quantised
        remove_lora(model)
        print("LoRA adapters merged into the weights before quantising", file=sys.stderr)
    group = args.group_size or default_group_size(model, fmt)
    quantization = QuantizationConfig(format=QuantFormat(fmt), group_size=group)
    before = expert_weight_bytes(model)
    quantize_experts(model, quantization)
    after = expert_weight_bytes(model)
    save_pretrained(model, args.destination)
    carry_tokenizer(args.model, args.destination)  # the tokenizer travels with the weights
    print(
        f"wrote {args.destination}: experts {fmt}, group size {group}, "
        f"{before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB "
        f"({before / max(after, 1):.1f}x smaller)"
    )
    return 0
