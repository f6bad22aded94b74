"""Type checks of config dataclasses against their annotations, naming the field.

Every moekit config calls :func:`check_fields` first thing in ``__post_init__``, so a config
built in Python, loaded from JSON/TOML/YAML or changed by ``--set key=value`` is checked the
same way: bools must be bools (``"yes"`` or ``"false"`` are refused, never taken as true),
integers integers (``2.5`` and ``"abc"`` are refused), floats finite numbers (NaN and infinity
are refused), enums one of their values (a string is turned into the member), and a nested
section a config object (a scalar where a section belongs is refused).

Why not pydantic: in its default (lax) mode it turns ``"yes"`` and ``"false"`` into bools,
which is exactly the silent conversion to avoid; its strict mode refuses enum values given as
JSON strings; and moekit would gain a dependency for one small function.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from enum import Enum
from functools import cache
from typing import Any

import torch


class ConfigError(ValueError):
    """A config value of the wrong type or out of range; the message names the key."""


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _allowed(enum_cls: type[Enum]) -> str:
    return ", ".join(repr(m.value) for m in enum_cls)


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """``value`` checked against ``annotation`` (enums converted); raises :class:`ConfigError`."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return coerce(value, option, name)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {'; or '.join(errors)}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return type(value)(coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        try:
            return annotation(value)
        except ValueError:
            raise ConfigError(
                f"{name} must be one of {_allowed(annotation)}, got {value!r}"
            ) from None
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, annotation):  # type: ignore[arg-type]
            raise ConfigError(
                f"{name} must be a section of options "
                f"({getattr(annotation, '__name__', annotation)}), got {value!r}"
            )
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value


def check_fields(config: Any, prefix: str = "") -> None:
    """Check (and convert enum strings of) every field of the dataclass ``config`` in place."""
    hints = _hints(typing.cast(Any, type(config)))
    for f in dataclasses.fields(config):
        value = coerce(getattr(config, f.name), hints[f.name], f"{prefix}{f.name}")
        object.__setattr__(config, f.name, value)


def check_layer_input(
    x: Any,
    d_model: int,
    padding_mask: Any = None,
    token_ids: Any = None,
    check_finite: bool = False,
    device: Any = None,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument when an MoE layer's input is
    malformed: ``x`` must be a floating ``(..., d_model)`` tensor, ``padding_mask`` a bool
    tensor of shape ``x.shape[:-1]``, ``token_ids`` an integer tensor of that shape; with
    ``check_finite`` NaN/Inf in ``x`` are refused (one reduction)."""

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != d_model:
        raise ValueError(f"x must have shape (..., d_model={d_model}), got {tuple(x.shape)}")
    if padding_mask is not None:
        if not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool:
            raise TypeError(
                "padding_mask must be a bool tensor (True = real token), got "
                f"{getattr(padding_mask, 'dtype', type(padding_mask).__name__)}"
            )
        if padding_mask.shape != x.shape[:-1]:
            raise ValueError(
                f"padding_mask must have shape x.shape[:-1]={tuple(x.shape[:-1])}, "
                f"got {tuple(padding_mask.shape)}"
            )
    if token_ids is not None and (
        not isinstance(token_ids, torch.Tensor)
        or token_ids.shape != x.shape[:-1]
        or token_ids.is_floating_point()
    ):
        raise ValueError(
            f"token_ids must be an integer tensor of shape x.shape[:-1]={tuple(x.shape[:-1])}, "
            f"got {getattr(token_ids, 'shape', None)} {getattr(token_ids, 'dtype', None)}"
        )
    if device is not None and x.device != device:
        raise ValueError(
            f"x is on {x.device} but the layer's weights are on {device}: move one to the other "
            "(model.to(device) or x.to(device))"
        )
    if check_finite and not torch.isfinite(x).all():
        raise ValueError("x contains NaN or Inf values (check_finite=True)")
