"""What the accounting commands (``params``, ``plan``) accept, read one way: a Hugging Face or
moekit ``config.json`` (or its folder), a run folder (its latest checkpoint), a checkpoint
folder, ``checkpoints/latest``, or a training config file (TOML, YAML or JSON with a ``model``
section)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TRAIN_CONFIG_SUFFIXES = (".toml", ".yaml", ".yml")


def model_config_source(path_text: str) -> tuple[dict[str, Any], Any]:
    """``(config.json dict or {}, moekit model config or None)`` of the model at ``path_text``;
    exactly one of them describes the model (the moekit config when it is not ``None``)."""
    from moekit.models.checkpoint import read_config
    from moekit.training.checkpoint import resolve_checkpoint
    from moekit.training.config import load_train_config
    from moekit.utils.serialization import read_config_file

    path = Path(path_text)
    if not path.exists():
        raise FileNotFoundError(f"no config.json at {path_text}: it does not exist")
    if path.is_file() and (path.suffix in TRAIN_CONFIG_SUFFIXES or _is_train_config(path)):
        return {}, load_train_config(str(path)).model
    folder = path if path.is_dir() else path.parent
    if (path.is_dir() and not (path / "config.json").is_file()) or path.name == "latest":
        folder = resolve_checkpoint(path_text)  # a run folder or checkpoints/latest
    config_file = folder / "config.json" if path.is_dir() or path.name == "latest" else path
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no config.json at {path_text}: give a config.json, a model or checkpoint folder, "
            "a run folder, or a training config file (.toml/.yaml/.json)"
        )
    data = read_config_file(config_file)  # names the file and line of a bad one
    if str(data.get("model_type", "")).startswith("moekit_"):
        return data, read_config(config_file.parent)[1]
    return data, None


def _is_train_config(path: Path) -> bool:
    """A ``.json`` training config: a ``model`` section and no ``model_type``."""
    if path.suffix != ".json":
        return False
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and "model" in data and "model_type" not in data
