"""One tokenizer story: where a model's tokenizer lives and how every command finds it.

A model's tokenizer is either **bytes** (moekit's own ``ByteTokenizer``, ``vocab_size`` 256) or a
**Hugging Face tokenizer** whose files sit in a folder. Every folder moekit writes carries a copy
of those files, so nothing depends on the path that was typed when the run started:

- a run folder holds ``tokenizer/`` (copied when training starts);
- a Hugging Face folder, and every model folder moekit writes (``convert``, ``upcycle``,
  ``quantize``, ``consolidate``, ``finetune --export-hf``), holds the files at its top level, as
  ``transformers`` expects.

:func:`find_tokenizer_folder` looks for them in that order from any folder a command takes (a run,
a checkpoint inside it, ``checkpoints/latest``, an HF or moekit model folder), then falls back to
the run's recorded ``data.tokenizer``; :func:`resolve_tokenizer` loads it and refuses a tokenizer
that does not fit the model's vocabulary, naming both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moekit.training.checkpoint import latest_checkpoint
from moekit.training.data import ByteTokenizer, HFTokenizer

# the files a Hugging Face tokenizer may consist of (any that exist are copied)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# any of these makes a folder a tokenizer folder
_DEFINING = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
RUN_TOKENIZER_DIR = "tokenizer"
STATE_FILE = "trainer_state.json"


def has_tokenizer(folder: str | Path) -> bool:
    """Whether ``folder`` holds a Hugging Face tokenizer's files."""
    folder = Path(folder)
    return folder.is_dir() and any((folder / name).is_file() for name in _DEFINING)


def copy_tokenizer(source: str | Path | None, destination: str | Path) -> bool:
    """Copy the tokenizer files of ``source`` (a tokenizer folder; ``None``: bytes, nothing to
    copy) into ``destination``. Returns whether anything was copied."""
    if source is None:
        return False
    source, destination = Path(source), Path(destination)
    if not has_tokenizer(source):
        raise FileNotFoundError(
            f"{source} holds no tokenizer (none of {', '.join(_DEFINING)}); data.tokenizer must "
            "name a folder with a Hugging Face tokenizer's files"
        )
    if source.resolve() == destination.resolve():
        return True
    destination.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)
    return True


def _run_folder_of(folder: Path) -> Path | None:
    """The run folder a checkpoint folder belongs to (``RUN/checkpoints/step_N``)."""
    if folder.parent.name == "checkpoints":
        return folder.parent.parent
    return None


def _model_folder(path: Path) -> Path | None:
    """``path`` itself when it is a model folder, else the latest checkpoint of a run folder
    (``checkpoints/latest`` is read as the checkpoint it names)."""

    if path.is_file() and path.name == "latest":  # the pointer file itself
        return latest_checkpoint(path.parent)
    if (path / "config.json").is_file():
        return path
    return latest_checkpoint(path / "checkpoints")


def find_tokenizer_folder(path: str | Path) -> Path | None:
    """The folder holding the tokenizer of the model at ``path`` (a run folder, a checkpoint
    folder, ``checkpoints/latest``, a Hugging Face or moekit model folder); ``None`` means the
    model reads bytes (or predates this and recorded no tokenizer: see
    :func:`resolve_tokenizer`)."""
    path = Path(path)
    candidates = [path, path / RUN_TOKENIZER_DIR]
    model = _model_folder(path)
    if model is not None:
        candidates.append(model)
        run = _run_folder_of(model)
        if run is not None:
            candidates.append(run / RUN_TOKENIZER_DIR)
    for candidate in candidates:
        if has_tokenizer(candidate):
            return candidate
    recorded = recorded_tokenizer(path)
    if recorded is not None and has_tokenizer(recorded):
        return Path(recorded)
    return None


def recorded_tokenizer(path: str | Path) -> str | None:
    """The ``data.tokenizer`` a run recorded in its checkpoint's trainer state (as typed)."""
    model = _model_folder(Path(path))
    if model is None or not (model / STATE_FILE).is_file():
        return None
    data = json.loads((model / STATE_FILE).read_text()).get("train_config", {}).get("data", {})
    value = data.get("tokenizer")
    return str(value) if value else None


def resolve_tokenizer(
    path: str | Path, vocab_size: int, override: str | None = None
) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of the model at ``path`` whose embedding has ``vocab_size`` rows.

    Args:
        path: what the user gave the command (run, checkpoint or model folder).
        vocab_size: the model's vocabulary size.
        override: a tokenizer folder given explicitly (``--tokenizer``); ``"bytes"`` for bytes.

    Raises:
        ValueError: no tokenizer was found for a model that does not read bytes, or the
            tokenizer has more tokens than the model's vocabulary.
    """
    if override == "bytes":
        folder = None
    elif override is not None:
        folder = Path(override)
        if not has_tokenizer(folder):
            raise ValueError(
                f"--tokenizer {override}: not a tokenizer folder (none of {', '.join(_DEFINING)})"
            )
    else:
        folder = find_tokenizer_folder(path)
    if folder is None:
        if vocab_size != ByteTokenizer.vocab_size:
            recorded = recorded_tokenizer(path)
            hint = (
                f" (the run recorded data.tokenizer={recorded!r}, which is gone)"
                if recorded
                else ""
            )
            raise ValueError(
                f"{path}: the model has vocab_size {vocab_size}, not the 256 of byte tokens, and "
                f"no tokenizer was found beside it{hint}; pass --tokenizer FOLDER"
            )
        return ByteTokenizer()
    tokenizer = HFTokenizer(str(folder))
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer in {folder} has {tokenizer.vocab_size} tokens but the model at {path} "
            f"has vocab_size {vocab_size}: they do not belong together"
        )
    return tokenizer


def tokenizer_label(tokenizer: ByteTokenizer | HFTokenizer) -> str:
    """``byte`` or ``token``: the unit of a per-position loss."""
    return "byte" if isinstance(tokenizer, ByteTokenizer) else "token"
