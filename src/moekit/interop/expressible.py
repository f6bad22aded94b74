"""What a Hugging Face family can express, checked in both directions from one table per family.

Import: every key of an HF ``config.json`` is either *mapped* (read by the family's
``config_from_hf``), *fixed* (it changes the function and moekit supports only the listed
values), or *inert* (metadata and training-only options that do not change the logits). A fixed
key with another value, or an unknown key that is set, is refused with every offending key
named: a field moekit does not understand must never be dropped silently.

Export: a moekit config is expressible in a family when the family's own import gives it back:
``config_from_hf(config_to_hf(config))`` must equal ``config`` on every field that changes the
function (:func:`function_fields`). The import direction is therefore the single source of
truth, and export refuses, listing every option the family lacks.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Keys that never change a model's logits: bookkeeping, generation defaults, training-only
# coefficients (the auxiliary-loss weights are mapped where moekit has them, but a difference
# there does not change the function).
INERT_HF_FIELDS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "attention_dropout",
        "auto_map",
        "bos_token_id",
        "chunk_size_feed_forward",
        "dtype",
        "eos_token_id",
        "id2label",
        "initializer_range",
        "is_encoder_decoder",
        "label2id",
        "model_type",
        "num_nextn_predict_layers",  # DeepSeek-V3 multi-token-prediction heads: not in the LM
        "output_attentions",
        "output_hidden_states",
        "output_router_logits",
        "pad_token_id",
        "problem_type",
        "return_dict",
        "router_aux_loss_coef",
        "router_jitter_noise",
        "router_z_loss_coef",
        "tokenizer_class",
        "torch_dtype",
        "transformers_version",
        "use_cache",
    }
)

# Keys that mark a quantised checkpoint, which moekit cannot load as float weights.
QUANTISED_MARKERS = ("quantization_config", "compression_config")


@dataclass(frozen=True)
class HFFields:
    """One family's classification of its HF ``config.json`` keys.

    Attributes:
        mapped: keys its ``config_from_hf`` reads into the moekit config.
        fixed: keys that change the function, with the only values moekit maps (a value may be
            a callable predicate).
    """

    mapped: frozenset[str]
    fixed: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def known(self) -> frozenset[str]:
        return self.mapped | frozenset(self.fixed) | INERT_HF_FIELDS


def _allowed(value: Any, allowed: tuple[Any, ...]) -> bool:
    return any(
        option(value)
        if callable(option)
        else value == option and isinstance(value, bool) == isinstance(option, bool)
        for option in allowed
    )


def unset(value: Any) -> bool:
    """unset (null, false, 0 or empty)"""
    return not _is_set(value)


def any_value(value: Any) -> bool:
    """any value (unused by this family's forward under the other fixed keys)"""
    return True


def all_full_attention(value: Any) -> bool:
    """every layer 'full_attention'"""
    return value is None or all(t == "full_attention" for t in value)


def quant_method(hf: Mapping[str, Any]) -> str | None:
    """The ``quant_method`` of a quantised HF config (``"unknown"`` when unnamed), else
    ``None``."""
    for marker in QUANTISED_MARKERS:
        if hf.get(marker):
            section = hf[marker]
            return (
                str(dict(section).get("quant_method", "unknown"))
                if isinstance(section, Mapping)
                else "unknown"
            )
    return None


def check_hf_config(
    hf: Mapping[str, Any],
    family: str,
    fields: HFFields,
    strict: bool = True,
    quantization: tuple[str, ...] = (),
) -> None:
    """Raise ``ValueError`` naming every key of ``hf`` that ``family``'s import cannot map.

    ``strict=False`` (parameter accounting) checks only the fixed keys: quantised checkpoints
    and unknown keys do not change the architecture's shape. ``quantization``: the quantisation
    methods the family imports (GPT-OSS: ``mxfp4``); any other is refused.
    """
    method = quant_method(hf) if strict else None
    if method is not None and method not in quantization:
        for marker in QUANTISED_MARKERS:
            if not hf.get(marker):
                continue
            raise ValueError(
                f"this {family} checkpoint is quantised ({marker}.quant_method={method!r}); "
                + (
                    f"moekit imports {family} quantised as {', '.join(quantization)} only"
                    if quantization
                    else "moekit loads float weights only"
                )
                + ": dequantise it first (e.g. load it in transformers and save_pretrained in "
                "bf16/fp32)"
            )
    problems = [
        f"{key}={hf[key]!r} (supported: {', '.join(_describe(a) for a in allowed)})"
        for key, allowed in fields.fixed.items()
        if key in hf and not _allowed(hf[key], allowed)
    ]
    known = fields.known()
    problems += [
        f"{key}={hf[key]!r} (an option moekit does not map)"
        for key in sorted(hf)
        if strict and key not in known and not key.startswith("_") and _is_set(hf[key])
    ]
    if problems:
        raise ValueError(
            f"cannot import this {family} config: " + "; ".join(problems) + ". Importing it "
            "would give different outputs, so it is refused."
        )


def _describe(option: Any) -> str:
    return str(option.__doc__) if callable(option) else repr(option)


def _is_set(value: Any) -> bool:
    return value not in (None, False, 0, 0.0, "", [], {})


# moekit config fields that do not change what a trained model computes (training-only
# options, numerics of the router's dtype), so export ignores them.
_NOT_FUNCTION = (
    "moe.layer.d_model",  # always the model's
    "moe.layer.aux_loss",
    "moe.layer.statistics",
    "moe.layer.check_finite",
    "moe.layer.experts.kernel",
    "moe.layer.experts.dropout",  # training only
    "moe.layer.router.bias_update_rate",
    "moe.layer.router.jitter_eps",
    "moe.layer.router.float32",
    "moe.layer.dispatch.capacity_factor",
    "moe.layer.dispatch.eval_capacity_factor",
    "moe.layer.dispatch.min_capacity",
    "moe.layer.dispatch.drop_priority",
    "attention.aux_loss",  # training only (a mixture of attention heads' router)
)


def _every_layer_moe(config: Any) -> bool:
    moe, n_layers = getattr(config, "moe", None), getattr(config, "n_layers", None)
    if moe is None or n_layers is None or getattr(moe, "layer", None) is None:
        return False
    return all(moe.is_moe_layer(i) for i in range(n_layers))


def function_fields(config: Any, prefix: str = "") -> dict[str, Any]:
    """The config's fields that change its function, flattened (``{"moe.layer.top_k": 2}``)."""
    out: dict[str, Any] = {}
    kind = getattr(type(config), "kind", None)
    if isinstance(kind, str):  # sibling configs chosen by class (attention mixers)
        out[f"{prefix}kind"] = kind
    skip = set()
    if _every_layer_moe(config):  # no dense FFN: its width is moot
        skip.add("ffn_hidden")
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        name = f"{prefix}{f.name}"
        if name in _NOT_FUNCTION:
            continue
        value = getattr(config, f.name)
        if f.name == "token_mixers":  # what each block runs, however the layout names it
            out[name] = tuple(
                (config.token_mixer_of_layer(i), config.has_channel_mixer(i))
                for i in range(config.n_layers)
            )
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(function_fields(value, f"{name}."))
        else:
            out[name] = value.value if isinstance(value, enum.Enum) else value
    return out


class Refusal(str):
    """A family's whole-sentence refusal (not one option it cannot express)."""


def export_refusal(family: str, problems: list[str]) -> str:
    """The one-line message refusing an export to ``family`` for ``problems`` (from
    :func:`export_problems`)."""
    sentences = [p for p in problems if isinstance(p, Refusal)]
    options = [p for p in problems if not isinstance(p, Refusal)]
    parts: list[str] = [*sentences]
    if options:
        parts.append("the family cannot express " + "; ".join(options))
    return (
        f"cannot export as {family!r}: "
        + "; ".join(parts)
        + ". The exported model would compute something else, so nothing was written."
    )


def export_problems(
    config: Any,
    to_hf: Callable[[Any], dict[str, Any]],
    from_hf: Callable[[dict[str, Any]], Any],
) -> list[str]:
    """Every function-changing option of ``config`` that does not survive the round trip."""
    layer = config.moe.layer
    if layer is not None and layer.router.kind.value not in ("top_k", "sparsemixer"):
        router = layer.router
        return [
            f"moe.layer.router.kind={router.kind.value!r} (Hugging Face MoE families route by "
            "token-choice top-k)"
        ]
    try:
        back = from_hf(to_hf(config))
    except ValueError as error:  # the family refuses the model as a whole, in a sentence
        return [Refusal(str(error).rstrip("."))]
    want, got = function_fields(config), function_fields(back)
    return [
        f"{name}={want[name]!r} (the family gives {got.get(name)!r})"
        for name in want
        if want[name] != got.get(name)
    ]


def fold_uniform_expert_counts(config: Any) -> Any:
    """``config`` with a uniform ``experts_per_layer`` (every MoE layer pruned or merged to the
    same count) folded into ``layer.num_experts``: what a family with one expert count per model
    can express. Each placement is folded on its own (an encoder–decoder has two)."""

    def fold(placement: Any) -> Any:
        counts = getattr(placement, "experts_per_layer", None)
        if placement is None or placement.layer is None or not counts or len(set(counts)) != 1:
            return placement
        layer = dataclasses.replace(placement.layer, num_experts=counts[0])
        return dataclasses.replace(placement, layer=layer, experts_per_layer=None)

    names = [n for n in ("moe", "encoder_moe", "decoder_moe") if hasattr(config, n)]
    return dataclasses.replace(config, **{n: fold(getattr(config, n)) for n in names})
