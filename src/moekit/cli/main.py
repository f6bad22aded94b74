"""The ``moekit`` command: one entry point, one module per subcommand."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from moekit.cli import convert, demo, evaluate, example, generate, params, plan, train, upcycle

SUBCOMMANDS = {
    "demo": demo,
    "train": train,
    "eval": evaluate,
    "generate": generate,
    "params": params,
    "plan": plan,
    "convert": convert,
    "upcycle": upcycle,
    "example": example,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        module.add_parser(
            sub.add_parser(
                name,
                help=module.HELP,
                description=module.HELP,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
            )
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return SUBCOMMANDS[args.command].run(args)


if __name__ == "__main__":
    raise SystemExit(main())
