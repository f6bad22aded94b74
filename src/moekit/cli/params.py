"""``moekit params``: parameter, FLOP and memory accounting for a model config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moekit.analysis.params import ParamReport, count_parameters
from moekit.interop.hf import CONFIG_PARSERS

HELP = (
    "Count total and active parameters, forward FLOPs per token and weight memory of a "
    "Hugging Face config.json (" + ", ".join(CONFIG_PARSERS) + ") or a moekit run, "
    "checkpoint or training config."
)


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        help="a config.json (HF or moekit) or its folder, a run folder, a checkpoint folder, "
        "or a training config file (.toml/.yaml/.json)",
    )
    parser.add_argument(
        "--context", type=int, default=4096, help="context length for attention FLOPs"
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _load(path: Path, context: int) -> ParamReport:
    from moekit.cli.sources import model_config_source

    data, moekit_config = model_config_source(str(path))
    return count_parameters(moekit_config if moekit_config is not None else data, context)


def format_report(r: ParamReport) -> str:
    lines = [
        f"{r.name}: {_human(r.total)} total, {_human(r.active)} active per token "
        f"({_human(r.active_non_embedding)} without the input embedding)",
        "",
        f"{'component':<16}{'total':>12}{'active':>12}",
    ]
    for key, value in r.breakdown.items():
        if value:
            lines.append(f"{key:<16}{_human(value):>12}{_human(r.active_breakdown[key]):>12}")
    lines += [
        "",
        f"forward FLOPs per token (context {r.context}): {_human(r.flops_per_token)}",
        "weight memory: "
        + ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in r.weight_bytes.items()),
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = _load(Path(args.config), args.context)
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_report(result))
    return 0
