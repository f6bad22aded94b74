"""What the attention token mixers share: the config base of softmax attention
(``AttentionConfig``), latent attention (``MLAConfig``) and a mixture of attention heads
(``MoAConfig``), which are sibling classes chosen by config class (in files by a ``kind`` key),
and the reading of config files written before they were siblings.

Each sibling answers what the model asks of any attention mixer: its heads (``n_heads``,
``kv_heads``, ``head_width``), its rotary positions (``rope``, ``rotary_dim``), whether it is
``causal``, ``resolved(d_model=...)`` (defaults filled in) and
``build(*, d_model, norm_eps)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from moekit.utils.serialization import config_from_dict, config_to_dict
from moekit.utils.validation import ConfigError

#: ``kind`` of the softmax attention config (the default when a file names none)
SOFTMAX_KIND = "attention"


@dataclass(kw_only=True)
class AttentionMixerConfig:
    """Base of the attention mixers' configs; each subclass sets ``kind`` and builds its module
    with ``build(*, d_model, norm_eps)``."""

    kind: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[AttentionMixerConfig]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if isinstance(kind, str) and kind:
            AttentionMixerConfig.registry[kind] = cls

    def build(self, *, d_model: int, norm_eps: float = 1e-6) -> nn.Module:
        """The mixer on a stream of width ``d_model`` (``norm_eps``: its norms' epsilon)."""
        raise NotImplementedError

    def to_config_dict(self) -> dict[str, Any]:
        """The file form: ``kind`` first, then the fields."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"kind": self.kind, **config_to_dict(fields)}

    @classmethod
    def from_config_dict(cls, data: dict[str, Any], section: str = "attention"):
        """The sibling ``data["kind"]`` names (``attention`` when absent); a file written
        before the siblings (``mla = {...}``, ``rope_theta``, ...) is read as it meant."""
        options = upgrade_attention_dict(data, section)
        kind = options.pop("kind", SOFTMAX_KIND)
        config_class = AttentionMixerConfig.registry.get(kind)
        if config_class is None:
            raise ConfigError(
                f"{section}.kind={kind!r} is not an attention mixer; choose one of "
                f"{', '.join(sorted(AttentionMixerConfig.registry))}"
            )
        return config_from_dict(config_class, options, section)


def upgrade_attention_dict(data: dict[str, Any], section: str = "attention") -> dict[str, Any]:
    """An attention section as written before the siblings, in today's form: ``rotary``,
    ``rope_theta``, ``rope_scaling`` and ``partial_rotary_factor`` become ``rope``; the Llama 4
    temperature keys ``query_temperature``; ``mla = {...}`` and ``moa = {...}`` their own kinds;
    ``norm_eps`` (now the model's) is dropped. A current section comes back unchanged."""
    options = dict(data)
    legacy_rope = {"rotary", "rope_theta", "rope_scaling", "partial_rotary_factor"}
    if legacy_rope & set(options):
        rotary = options.pop("rotary", True)
        rope = {
            "theta": options.pop("rope_theta", 10000.0),
            "scaling": options.pop("rope_scaling", None),
            "partial_factor": options.pop("partial_rotary_factor", 1.0),
        }
        options["rope"] = rope if rotary else None
    options.pop("norm_eps", None)
    if "temperature_floor_scale" in options or "temperature_scale" in options:
        floor = options.pop("temperature_floor_scale", 0)
        scale = options.pop("temperature_scale", 0.1)
        options["query_temperature"] = {"floor_scale": floor, "scale": scale} if floor else None
    mla, moa = options.pop("mla", None), options.pop("moa", None)
    if mla is not None and moa is not None:
        raise ConfigError(f"{section} sets both mla and moa; an attention mixer is one of them")
    if mla is not None:
        rope = options.get("rope") or {}
        options = {
            "kind": "mla",
            "n_heads": options["n_heads"],
            "rope": {"theta": rope.get("theta", 10000.0), "scaling": rope.get("scaling")},
            **mla,
        }
    elif moa is not None:
        options = {
            "kind": "moa",
            "n_kv_heads": options.get("n_kv_heads") or options["n_heads"],
            "head_dim": options.get("head_dim"),
            "causal": options.get("causal", True),
            "rope": options.get("rope"),
            **moa,
        }
    return options
