"""Every name of moekit's public API (``__all__`` of the package and its subpackages) has a
docstring, and so has every public method its classes define; where a docstring lists its
arguments (``Args:``), the list is the signature's: no stale name, none left out."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re

import moekit

PACKAGES = ["moekit"] + [
    f"moekit.{m.name}" for m in pkgutil.iter_modules(moekit.__path__) if m.ispkg and m.name != "cli"
]


def _public_objects():
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                yield f"{package}.{name}", obj


def _undocumented(obj) -> list[str]:
    missing = []
    if not (obj.__doc__ or "").strip():
        missing.append("")
    if inspect.isclass(obj) and obj.__module__.startswith("moekit"):
        for attr, member in vars(obj).items():
            if attr.startswith("_") or not inspect.isfunction(member):
                continue
            if not (member.__doc__ or "").strip() and not _inherits_doc(obj, attr):
                missing.append(f".{attr}")
    return missing


def _inherits_doc(cls, attr: str) -> bool:
    """A method that overrides a documented one (``forward``, ``extra_repr``) needs no text of
    its own."""
    return any(
        (getattr(base, attr, None).__doc__ or "").strip()
        for base in cls.__mro__[1:]
        if getattr(base, attr, None) is not None
    )


def test_public_api_is_documented():
    missing = sorted(
        f"{name}{suffix}" for name, obj in _public_objects() for suffix in _undocumented(obj)
    )
    assert not missing, f"{len(missing)} public names without a docstring: {missing}"


def documented_args(doc: str | None) -> list[str] | None:
    """The names an ``Args:`` section lists (``a, b: ...`` lists two), or ``None``."""
    match = re.search(r"\n\s*Args:\n(.*?)(\n\s*\n\s*[A-Z][a-z]+:|\Z)", doc or "", re.S)
    if match is None:
        return None
    names, indent = [], None
    for line in match.group(1).split("\n"):
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth == indent:
            head = line.strip().split(":", 1)[0]
            names += [n.strip().split(" ")[0].lstrip("*") for n in head.split(",") if n.strip()]
    return names


def test_documented_arguments_are_the_signatures():
    stale, undocumented = [], []
    for name, obj in _public_objects():
        listed = documented_args(obj.__doc__)
        if listed is None:
            continue
        try:
            params = [
                p for p in inspect.signature(obj).parameters if p not in ("self", "args", "kwargs")
            ]
        except (TypeError, ValueError):
            continue
        known = set(params)
        if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
            known |= {f.name for f in dataclasses.fields(obj)}
        stale += [f"{name}: {a}" for a in listed if a not in known]
        undocumented += [f"{name}: {p}" for p in params if p not in listed]
    assert not stale, f"documented arguments the signature does not have: {stale}"
    assert not undocumented, f"arguments missing from the Args: sections: {undocumented}"
