"""``moekit merge``: fold similar experts together, write a new checkpoint."""

from __future__ import annotations

import argparse

from moekit.cli.compression import add_common, load_with_calibration, write_result

HELP = (
    "Fold a fraction of each layer's least-routed experts into their most similar kept expert "
    "(hidden units aligned by an assignment, frequency-weighted average)."
)


def add_parser(parser: argparse.ArgumentParser) -> None:
    add_common(parser)


def run(args: argparse.Namespace) -> int:
    from moekit.training.compress import merge

    model, batches = load_with_calibration(args)
    merged, groups = merge(model, batches, args.fraction)
    for name, layer_groups in groups.items():
        print(f"{name}: merged groups {[g for g in layer_groups if len(g) > 1]}")
    write_result(merged, args)
    return 0
