"""The layer pattern as data: which token mixer each block runs (a hybrid model is a config).

``pattern`` names one mixer per block, repeated when shorter than the model (``["linear",
"linear", "linear", "attention"]`` is Qwen3-Next's 3:1); ``"attention"`` is the model's
``attention``; every other name is a key of ``mixers``, whose entries are recurrent mixer configs
chosen by their ``kind`` (``gated_deltanet``, ``mamba2``, ``short_conv``). In a TOML file::

    [model.token_mixers]
    pattern = ["linear", "linear", "linear", "attention"]
    [model.token_mixers.mixers.linear]
    kind = "gated_deltanet"
    n_key_heads = 2
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moekit.models.common.attention import AttentionConfig
from moekit.models.common.attention_base import AttentionMixerConfig
from moekit.models.common.mla import MLAConfig
from moekit.models.common.moa import MoAConfig
from moekit.models.mixers import MIXER_CONFIGS, RecurrentMixerConfig
from moekit.utils.serialization import config_from_dict, config_to_dict
from moekit.utils.validation import ConfigError

#: any attention mixer's config (the siblings of ``attention_base.AttentionMixerConfig``)
AnyAttentionConfig = AttentionConfig | MLAConfig | MoAConfig
#: any token mixer's config
TokenMixerConfig = AnyAttentionConfig | RecurrentMixerConfig

ATTENTION = "attention"
NONE = "none"  # a block without this sublayer (Nemotron-H's one-sublayer blocks)
FFN = "ffn"


@dataclass(kw_only=True)
class TokenMixerLayout:
    """Which token mixer each block runs.

    Args:
        pattern: mixer names, one per block, repeated to the model's depth; ``"none"``: the
            block has no token mixer (nor its norm).
        mixers: the other mixers' configs by name: recurrent mixers, or attention configs
            other than the model's (``"attention"`` and ``"none"`` are reserved).
        channel: per block (repeated likewise) ``"ffn"`` (the dense FFN or MoE layer the
            ``moe`` placement gives it) or ``"none"`` (no channel mixer, nor its norm: a
            Mamba-only block as in Nemotron-H); ``None``: every block has one.
    """

    pattern: list[str]
    mixers: dict[str, TokenMixerConfig] = field(default_factory=dict)
    channel: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.pattern:
            raise ValueError("token_mixers.pattern must name at least one mixer")
        for reserved in (ATTENTION, NONE):
            if reserved in self.mixers:
                raise ValueError(f"token_mixers.mixers cannot redefine {reserved!r}")
        if self.channel is not None and (not self.channel or set(self.channel) - {FFN, NONE}):
            raise ValueError(
                f"token_mixers.channel must list 'ffn' or 'none' per block, got {self.channel}"
            )
        known = {ATTENTION, NONE}
        unknown = sorted({n for n in self.pattern if n not in known and n not in self.mixers})
        if unknown:
            raise ValueError(
                f"token_mixers.pattern names {unknown}, which are neither 'attention' nor keys "
                f"of token_mixers.mixers ({', '.join(sorted(self.mixers)) or 'none'})"
            )
        for name, config in self.mixers.items():
            if not isinstance(config, RecurrentMixerConfig | AttentionMixerConfig):
                raise ValueError(
                    f"token_mixers.mixers.{name} must be a mixer config ({_kinds()}), got "
                    f"{type(config).__name__}"
                )

    def name_of_layer(self, index: int) -> str:
        return self.pattern[index % len(self.pattern)]

    def mixer_of_layer(self, index: int) -> RecurrentMixerConfig | None:
        """Block ``index``'s recurrent mixer config, or ``None`` (attention or no mixer)."""
        mixer = self.mixers.get(self.name_of_layer(index))
        return mixer if isinstance(mixer, RecurrentMixerConfig) else None

    def attention_variant_of_layer(self, index: int) -> AnyAttentionConfig | None:
        """Block ``index``'s own attention config when it is not the model's, else ``None``."""
        mixer = self.mixers.get(self.name_of_layer(index))
        return mixer if isinstance(mixer, AttentionMixerConfig) else None  # type: ignore[return-value]

    def is_attention(self, index: int) -> bool:
        """Whether block ``index`` runs an attention mixer (the model's or its own)."""
        name = self.name_of_layer(index)
        return name == ATTENTION or isinstance(self.mixers.get(name), AttentionMixerConfig)

    def has_channel_mixer(self, index: int) -> bool:
        return self.channel is None or self.channel[index % len(self.channel)] == FFN

    def attention_layers(self, n_layers: int) -> list[int]:
        return [i for i in range(n_layers) if self.is_attention(i)]

    def to_config_dict(self) -> dict[str, Any]:
        """The file form: every entry names its ``kind``."""

        mixers = {name: config_to_dict(mixer) for name, mixer in self.mixers.items()}
        out: dict[str, Any] = {"pattern": list(self.pattern), "mixers": mixers}
        out["channel"] = None if self.channel is None else list(self.channel)
        return out

    @classmethod
    def from_config_dict(cls, data: dict[str, Any], section: str = "token_mixers"):
        """Each ``mixers`` entry's ``kind`` picks its config class."""

        options = dict(data)
        unknown = sorted(set(options) - {"pattern", "mixers", "channel"})
        if unknown:
            raise ConfigError(
                f"unknown {section} keys: {unknown} (known: channel, mixers, pattern)"
            )
        mixers: dict[str, TokenMixerConfig] = {}
        for name, entry in (options.get("mixers") or {}).items():
            where = f"{section}.mixers.{name}"
            if not isinstance(entry, dict) or "kind" not in entry:
                raise ConfigError(f"{where} must be a section with a kind ({_kinds()})")
            if entry["kind"] in AttentionMixerConfig.registry:
                mixers[name] = AttentionMixerConfig.from_config_dict(entry, where)
                continue
            entry = dict(entry)
            kind = entry.pop("kind")
            if kind not in MIXER_CONFIGS:
                raise ConfigError(f"{where}.kind={kind!r} is not a mixer; choose one of {_kinds()}")
            mixers[name] = config_from_dict(MIXER_CONFIGS[kind], entry, where)
        try:
            channel = options.get("channel")
            return cls(
                pattern=list(options.get("pattern", [])),
                mixers=mixers,
                channel=None if channel is None else list(channel),
            )
        except ValueError as error:
            raise ConfigError(str(error)) from None


def _kinds() -> str:
    """Every token mixer's ``kind``, for messages."""
    return ", ".join(sorted([*MIXER_CONFIGS, *AttentionMixerConfig.registry]))
