"""``moekit prune``: remove experts, write a new checkpoint."""

from __future__ import annotations

import argparse

from moekit.cli.compression import add_common, load_with_calibration, write_result

HELP = (
    "Remove a fraction of the experts by routing frequency or REAP saliency (gate weight × "
    "expert output norm) on calibration data, per layer or globally."
)


def add_parser(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument(
        "--method",
        choices=("frequency", "saliency"),
        default="frequency",
        help="rank experts by routed tokens, or by REAP saliency (gate weight × output norm)",
    )
    parser.add_argument(
        "--scope",
        choices=("layer", "global"),
        default="layer",
        help="prune the fraction in every layer, or of all experts together",
    )


def run(args: argparse.Namespace) -> int:
    from moekit.training.compress import prune

    model, batches = load_with_calibration(args)
    pruned, kept = prune(model, batches, args.fraction, method=args.method, scope=args.scope)
    for name, experts in kept.items():
        print(f"{name}: kept experts {experts}")
    write_result(pruned, args)
    return 0
