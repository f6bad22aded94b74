"""The ``moekit`` command: one entry point, one module per subcommand."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from moekit.cli import (
    adapter,
    classic,
    consolidate,
    convert,
    demo,
    evaluate,
    example,
    export_gguf,
    finetune,
    generate,
    grow,
    inspect,
    merge,
    params,
    plan,
    prune,
    quantize,
    train,
    upcycle,
)
from moekit.utils.progress import interactive, quiet_third_party_bars

SUBCOMMANDS = {
    "demo": demo,
    "train": train,
    "finetune": finetune,
    "eval": evaluate,
    "generate": generate,
    "inspect": inspect,
    "params": params,
    "plan": plan,
    "convert": convert,
    "consolidate": consolidate,
    "upcycle": upcycle,
    "grow": grow,
    "prune": prune,
    "merge": merge,
    "quantize": quantize,
    "export-gguf": export_gguf,
    "adapter": adapter,
    "example": example,
    "classic": classic,
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moekit")
    except PackageNotFoundError:
        return "unknown (not installed)"


class HelpWithDefaults(argparse.HelpFormatter):
    """Each option's help followed by its default, when it has one worth showing (not
    ``None``, ``False``, empty) and the help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default in ("", [], argparse.SUPPRESS))
        if shown and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"moekit {_version()}")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="load checkpoints without checking their weights against the recorded SHA-256 "
        "(faster for large models; sets MOEKIT_VERIFY_CHECKSUMS=0)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        module.add_parser(
            sub.add_parser(
                name,
                help=module.HELP,
                description=module.HELP,
                formatter_class=HelpWithDefaults,
            )
        )
    return parser


# What the library raises for bad input (arguments, configs, files): shown as one line. Any
# other exception is a bug in moekit and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)
REPORT_BUGS = "https://github.com/moekit/moekit/issues"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.no_verify:
        os.environ["MOEKIT_VERIFY_CHECKSUMS"] = "0"
    if getattr(args, "quiet", False) or not interactive():
        quiet_third_party_bars()
    try:
        return SUBCOMMANDS[args.command].run(args)
    except USER_ERRORS as error:
        print(f"moekit {args.command}: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `moekit params ... | head -1`: the reader is gone, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's exit flush must not fail again
        return 0
    except KeyboardInterrupt:
        print(f"moekit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(
            f"moekit {args.command}: unexpected error, which is a bug in moekit: please report "
            f"it with the traceback above at {REPORT_BUGS}",
            file=sys.stderr,
        )
        return 70


if __name__ == "__main__":
    raise SystemExit(main())
