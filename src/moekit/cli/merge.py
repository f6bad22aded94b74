"""``moekit merge``: fold similar experts together, write a new checkpoint."""

from __future__ import annotations

import argparse

from moekit.cli.compression import add_common, load_with_calibration, write_result

HELP = (
    "Fold a fraction of each layer's experts into kept ones: 'frequency' folds the least-routed "
    "into the kept expert with the most similar router row (frequency-weighted); 'ream' keeps "
    "the most salient (REAP) as centroids and groups by gated similarity, layer by layer "
    "(REAM, arXiv 2604.04356). Hidden units are aligned by an assignment before averaging."
)


def add_parser(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument(
        "--method",
        choices=("frequency", "ream"),
        default="frequency",
        help="how kept experts and groups are chosen (see above)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="REAM: the largest group, centroid included (default: 2 × ceil(E / kept))",
    )


def run(args: argparse.Namespace) -> int:
    from moekit.training.compress import merge
    from moekit.training.ream import ream_merge

    model, batches = load_with_calibration(args)
    if args.method == "ream":
        merged, groups = ream_merge(model, batches, args.fraction, group_size=args.group_size)
    else:
        if args.group_size is not None:
            raise ValueError("--group-size applies to --method ream")
        merged, groups = merge(model, batches, args.fraction)
    for name, layer_groups in groups.items():
        print(f"{name}: merged groups {[g for g in layer_groups if len(g) > 1]}")
    write_result(merged, args)
    return 0
