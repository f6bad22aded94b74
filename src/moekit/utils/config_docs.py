"""What each config key means, read from the config classes' own docstrings (``Args:``), and
a commented TOML rendering of a config (``moekit train --print-config``).

One source for the meaning of a key: the docstring beside the field. Errors about missing keys
and the printed default config both read it from there.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import typing
from enum import Enum
from typing import Any

_ARG_LINE = re.compile(r"^(\s+)([A-Za-z_][\w, ]*):\s*(.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: one-line meaning}`` from the ``Args:`` section of ``cls``'s docstring
    (a line ``a, b: text`` documents both ``a`` and ``b``)."""
    doc = inspect.getdoc(cls) or ""
    docs: dict[str, str] = {}
    in_args, indent, current = False, None, []
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Attributes:", "Fields:"):
            in_args, indent = True, None
            continue
        if not in_args:
            continue
        if line and not line.startswith(" "):  # the next section
            in_args = False
            continue
        match = _ARG_LINE.match(line)
        if match and (indent is None or len(match.group(1)) == indent):
            indent = len(match.group(1))
            current = [n.strip() for n in match.group(2).split(",")]
            for name in current:
                docs[name] = match.group(3).strip()
        elif current and line.strip():
            for name in current:
                docs[name] = f"{docs[name]} {line.strip()}".strip()
    return {k: " ".join(v.split()) for k, v in docs.items()}


def _sub_dataclass(annotation: Any) -> type | None:
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None


def missing_required(cls: type, given: dict[str, Any], section: str) -> list[str]:
    """``"section.key (meaning)"`` for every field of ``cls`` without a default that ``given``
    lacks."""
    docs = field_docs(cls)
    missing = []
    for f in dataclasses.fields(cls):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.init and no_default and f.name not in given:
            key = f"{section}.{f.name}" if section else f.name
            meaning = docs.get(f.name)
            missing.append(f"{key} ({meaning})" if meaning else key)
    return missing


def _toml_value(value: Any) -> str:
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if not isinstance(value, float) or value == value else "nan"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _comment(text: str, width: int = 96) -> list[str]:
    words, lines, line = text.split(), [], "#"
    for word in words:
        if len(line) + 1 + len(word) > width and line != "#":
            lines.append(line)
            line = "#"
        line += " " + word
    if line != "#":
        lines.append(line)
    return lines


def config_toml(config: Any, *, header: str = "", examples: dict[str, Any] | None = None) -> str:
    """A TOML file for ``config`` (a dataclass tree), a comment with each key's meaning above it.

    Keys whose value is ``None`` (optional sections and values) are written commented out with
    what they would hold; ``examples`` maps such a dotted section name to an example config to
    show there (commented out), e.g. the MoE layer of a dense default model."""
    examples = examples or {}
    lines: list[str] = _comment(header) if header else []

    def section(obj: Any, path: str, commented: bool) -> None:
        cls = type(obj)
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        prefix = "# " if commented else ""
        tables = []
        for f in dataclasses.fields(obj):
            if not f.init and f.name != "kind":  # a family's kind picks its config class
                continue
            value = getattr(obj, f.name)
            key = f"{path}.{f.name}" if path else f.name
            is_table = dataclasses.is_dataclass(value) or (
                value is None and _sub_dataclass(hints[f.name]) is not None
            )
            if is_table:
                tables.append((f.name, value, key))
                continue
            if docs.get(f.name):
                lines.extend(_comment(docs[f.name]))
            if value is None:
                lines.append(f"# {f.name} = ...  (unset)")
            else:
                lines.append(f"{prefix}{f.name} = {_toml_value(value)}")
        for name, value, key in tables:
            lines.append("")
            if docs.get(name):
                lines.extend(_comment(docs[name]))
            if value is None:
                example = examples.get(key)
                if example is None:
                    lines.append(f"# [{key}]  (unset)")
                    continue
                lines.append(
                    "# (unset; an example follows: uncomment its header and values to use it)"
                )
                lines.append(f"# [{key}]")
                section(example, key, True)
                continue
            lines.append(f"{'# ' if commented else ''}[{key}]")
            section(value, key, commented)

    section(config, "", False)
    return "\n".join(lines) + "\n"
