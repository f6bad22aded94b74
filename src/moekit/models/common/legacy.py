"""Reading model config files written before attention's per-layer options became a layer
pattern: ``attention.sliding_window_every`` (GPT-OSS's alternating windows) and
``attention.no_rope_layers`` (Llama 4's NoPE blocks) are now blocks with their own attention
config in ``token_mixers``; checkpoints saved before keep loading, to the same model."""

from __future__ import annotations

from typing import Any

from moekit.models.common.attention_base import SOFTMAX_KIND, upgrade_attention_dict
from moekit.utils.validation import ConfigError


def upgrade_model_dict(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a ``TransformerConfig`` section) with old per-layer attention keys turned into a
    ``token_mixers`` layout; a current section comes back unchanged."""
    attention = data.get("attention")
    if not isinstance(attention, dict):
        return data
    if "sliding_window_every" not in attention and "no_rope_layers" not in attention:
        return data
    options = upgrade_attention_dict(attention)
    every = int(options.pop("sliding_window_every", 1) or 1)
    nope = set(options.pop("no_rope_layers", None) or [])
    if every == 1 and not nope:
        return {**data, "attention": options}
    if data.get("token_mixers"):
        raise ConfigError(
            "attention.sliding_window_every and attention.no_rope_layers (an old config file) "
            "cannot be combined with token_mixers: give the windowed or NoPE blocks their own "
            "attention config in token_mixers.mixers"
        )
    n_layers = int(data["n_layers"])
    window = options.get("sliding_window", 0)
    main = {**options, "sliding_window": 0 if every > 1 else window}
    if nope:
        main["query_temperature"] = None
    names = {_key(main): "attention"}
    mixers: dict[str, dict[str, Any]] = {}
    pattern = []
    for i in range(n_layers):
        layer = dict(main)
        if every > 1 and i % every == 0:
            layer["sliding_window"] = window
        if i in nope:  # NoPE: no rotation, no chunks, the temperature tuning
            layer.update(
                rope=None, chunk_size=0, query_temperature=options.get("query_temperature")
            )
            if layer.get("qk_norm") == "weightless":
                layer["qk_norm"] = "none"
        key = _key(layer)
        if key not in names:
            name = "nope" if i in nope else "sliding"
            if every > 1 and i % every == 0 and i in nope:
                name = "sliding_nope"
            names[key] = name
            mixers[name] = {"kind": SOFTMAX_KIND, **layer}
        pattern.append(names[key])
    return {
        **data,
        "attention": main,
        "token_mixers": {"pattern": pattern, "mixers": mixers},
    }


def _key(options: dict[str, Any]) -> str:
    return repr(sorted(options.items(), key=lambda item: item[0]))
