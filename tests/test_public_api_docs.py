"""Every name of moekit's public API (``__all__`` of the package and its subpackages) has a
docstring, and so has every public method its classes define."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

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
