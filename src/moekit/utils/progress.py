"""Progress display that suits where the output goes: a ``tqdm`` bar in a terminal, nothing in a
pipe or a file (a bar's carriage-return redraws would fill a log with thousands of updates), and
the third-party bars (``transformers``' weight loading, ``huggingface_hub``'s downloads) quiet
under ``--quiet`` or outside a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm  # imported on use: the library imports nothing of it otherwise

Item = TypeVar("Item")


def interactive() -> bool:
    """Whether standard error is a terminal (bars redraw in place there)."""
    return sys.stderr.isatty()


def progress_bar(
    items: Iterable[Item], *, desc: str, enabled: bool = True, total: int | None = None
) -> Iterator[Item] | Iterable[Item]:
    """``items`` wrapped in a ``tqdm`` bar when ``enabled`` and standard error is a terminal;
    ``items`` unchanged otherwise."""
    if not (enabled and interactive()):
        return items

    return tqdm(items, desc=desc, leave=False, total=total)


def quiet_third_party_bars() -> None:
    """Silence ``transformers``' and ``huggingface_hub``'s progress bars and advisory warnings
    (environment variables for the libraries not imported yet, their switches for the ones
    already imported)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging  # noqa: PLC0415 (optional: transformers)

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
