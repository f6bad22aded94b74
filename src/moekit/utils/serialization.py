"""Config dataclasses <-> JSON-able dicts, and atomic file writes.

Configs are keyword-only dataclasses whose fields are numbers, strings, bools, enums, ``None``
or other config dataclasses; they round-trip through :func:`config_to_dict` /
:func:`config_from_dict` exactly, and unknown keys are an error that names them.
"""

from __future__ import annotations

import dataclasses
import hashlib
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

import tomllib

from moekit.utils.config_docs import missing_required
from moekit.utils.validation import ConfigError, coerce

T = TypeVar("T")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A nested dict of plain values (enums by value)."""

    def convert(value: Any) -> Any:
        own = getattr(value, "to_config_dict", None)
        if own is not None and not isinstance(value, type):  # a class with its own file form
            return own()
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
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


def _dataclass_for(annotation: Any, value: Any) -> Any:
    """The dataclass of ``annotation`` that a dict ``value`` describes: in a union of several
    (a model that is a ``TransformerConfig`` or an ``EncoderDecoderConfig``), the first whose
    fields hold every key of ``value``; else the first dataclass (whose errors name the keys)."""
    first = _dataclass_in(annotation)
    if first is None or not isinstance(value, dict):
        return first
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if dataclasses.is_dataclass(arg) and set(value) <= {
                f.name for f in dataclasses.fields(arg)
            }:
                return arg
    return first


def config_from_dict(cls: type[T], data: dict[str, Any], section: str = "") -> T:
    """Build ``cls`` from :func:`config_to_dict` output; unknown keys, values of the wrong type
    and values out of range raise :class:`ConfigError` naming the key (``model.moe.top_k``)."""
    where = f" in section {section!r}" if section else ""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{section or cls.__name__} must be a section of options (a table/object), got {data!r}"
        )
    prepare = getattr(cls, "prepare_config_dict", None)
    if prepare is not None:  # values that follow others (an MoE layer's d_model)
        data = prepare(data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(typing.cast(Any, cls))}
    unknown = sorted(set(data) - names)
    if unknown:
        keys = ", ".join(f"{section}.{k}" if section else k for k in unknown)
        moved = getattr(cls, "moved_keys", {})
        hints_moved = [
            f"{section}.{k} is now {section}.{moved[k]}" if section else f"{k} is now {moved[k]}"
            for k in unknown
            if k in moved
        ]
        raise ConfigError(
            f"unknown {cls.__name__} keys: {keys} (known: {', '.join(sorted(names))})"
            + (f"; {'; '.join(hints_moved)}" if hints_moved else "")
        )
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_for(hints[name], value)
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
    missing = missing_required(cls, kwargs, section)
    if missing:
        raise ConfigError(f"missing required config keys: {'; '.join(missing)}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:
        if not where or "in section" in str(error):  # a nested section already said where
            raise ConfigError(str(error)) from None
        raise ConfigError(f"{error}{where}") from None


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _with_user_mode(path: Path, *, folder: bool) -> None:
    """Give a ``tempfile``-made file (0600) or folder (0700) the mode ``open``/``mkdir`` would
    have given it under the user's umask (usually 0644 / 0755)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one; the
    file gets the mode the user's umask gives new files."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _with_user_mode(Path(tmp), folder=False)
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
        _with_user_mode(staging, folder=True)
        write(staging)
        for path in staging.rglob("*"):
            # some writers (safetensors) make their files 0600 whatever the umask
            _with_user_mode(path, folder=path.is_dir())
            if path.is_file():
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


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The options in a TOML, YAML or JSON file (by suffix), which must hold a table/mapping at
    the top. Every failure is a ``ValueError`` (or ``FileNotFoundError``) naming the file and,
    for a syntax error, the line: the command line prints it as one line (exit status 2)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a text file ({error.reason})") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{error.lineno}: not valid JSON: {error.msg} (column {error.colno})"
            ) from None
    elif suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path}: not valid TOML: {error}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml  # noqa: PLC0415 (optional: yaml)
        except ImportError:
            raise ValueError(f"{path}: YAML configs need PyYAML (pip install pyyaml)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ValueError(f"{path}{where}: not valid YAML: {problem}") from None
        if data is None:  # an empty file: no options
            data = {}
    else:
        raise ValueError(f"config file must end in .toml, .yaml, .yml or .json, got {path.name!r}")
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: the top level must be a table of options (key = value), "
            f"got a {type(data).__name__}"
        )
    return data


CHECKSUMS_FILE = "checksums.json"


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 16 MiB chunks."""

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def add_checksums(folder: str | os.PathLike, names: list[str]) -> None:
    """Record the SHA-256 of the files ``names`` of ``folder`` in its ``checksums.json`` (merged
    with what it already lists)."""
    folder = Path(folder)
    path = folder / CHECKSUMS_FILE
    sums = json.loads(path.read_text()) if path.is_file() else {}
    sums.update({name: file_sha256(folder / name) for name in names})
    atomic_write_json(path, dict(sorted(sums.items())))


def verify_checksums(folder: str | os.PathLike, names: list[str], verify: bool | None) -> None:
    """Check the files ``names`` of ``folder`` against its ``checksums.json``; a damaged file is
    a ``ValueError`` naming it. ``verify=None`` follows ``$MOEKIT_VERIFY_CHECKSUMS`` (``0`` turns
    checking off; ``moekit --no-verify`` sets it); folders written before checksums existed,
    or files they do not list, are not checked."""
    if verify is None:
        verify = os.environ.get("MOEKIT_VERIFY_CHECKSUMS", "1") != "0"
    path = Path(folder) / CHECKSUMS_FILE
    if not verify or not path.is_file():
        return
    try:
        sums = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is damaged ({error}); moekit --no-verify skips the check"
        ) from None
    for name in names:
        expected = sums.get(name)
        if expected is not None and file_sha256(Path(folder) / name) != expected:
            raise ValueError(
                f"{Path(folder) / name} is damaged: its SHA-256 differs from the one recorded in "
                f"{CHECKSUMS_FILE} when it was written (moekit --no-verify loads it anyway)"
            )
