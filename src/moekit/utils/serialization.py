"""Config dataclasses <-> JSON-able dicts, and atomic file writes.

Configs are keyword-only dataclasses whose fields are numbers, strings, bools, enums, ``None``
or other config dataclasses; they round-trip through :func:`config_to_dict` /
:func:`config_from_dict` exactly, and unknown keys are an error that names them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import types
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from moekit.utils.validation import ConfigError, coerce

T = TypeVar("T")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A nested dict of plain values (enums by value)."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return convert(config)


def _dataclass_in(annotation: Any) -> Any:
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def config_from_dict(cls: type[T], data: dict[str, Any], section: str = "") -> T:
    """Build ``cls`` from :func:`config_to_dict` output; unknown keys, values of the wrong type
    and values out of range raise :class:`ConfigError` naming the key (``model.moe.top_k``)."""
    where = f" in section {section!r}" if section else ""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{section or cls.__name__} must be a section of options (a table/object), got {data!r}"
        )
    upgrade = getattr(cls, "upgrade_config_dict", None)
    if upgrade is not None:  # older spellings of the same config
        data = upgrade(data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(typing.cast(Any, cls))}
    unknown = sorted(set(data) - names)
    if unknown:
        keys = ", ".join(f"{section}.{k}" if section else k for k in unknown)
        raise ConfigError(
            f"unknown {cls.__name__} keys: {keys} (known: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_in(hints[name])
        if sub is not None and isinstance(value, dict) and hasattr(sub, "from_config_dict"):
            # a family of configs picked by a key (router kinds)
            path = f"{section}.{name}" if section else name
            kwargs[name] = sub.from_config_dict(value, path)
            continue
        path = f"{section}.{name}" if section else name
        kwargs[name] = (
            config_from_dict(sub, value, path)
            if sub and isinstance(value, dict)
            else coerce(value, hints[name], path)  # names the full key in its message
        )
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:
        if not where or "in section" in str(error):  # a nested section already said where
            raise ConfigError(str(error)) from None
        raise ConfigError(f"{error}{where}") from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_folder_atomically(directory: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a fresh staging folder beside ``directory``, then swap it into place.

    An interruption before the swap leaves the previous ``directory`` untouched (and removes the
    staging folder); the swap itself is two renames, so at worst the previous version is found
    under ``.<name>.old`` beside it.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.saving."))
    try:
        write(staging)
        for path in staging.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if not directory.exists():
            os.replace(staging, directory)
            return directory
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
