"""Key-map pieces shared by the Llama-style families (Mixtral, Qwen-MoE, OLMoE, ...).

moekit names: ``embed``, ``blocks.{layer}.attn_norm`` / ``attn.{q,k,v,o}_proj`` /
``attn.{q,k}_norm`` / ``ffn_norm`` / ``ffn`` (a ``FeedForward`` or an ``MoE`` with ``router``,
``experts`` and ``shared_experts``), ``norm``, ``lm_head``. A gated moekit FFN stores
``w_in`` as ``[gate | up]`` along its output dimension; HF stores ``gate_proj``/``up_proj`` (or
``w1``/``w3``) as ``nn.Linear`` weights ``(out, in)``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from moekit.interop.keymap import Entry, Experts, Joined, Rename
from moekit.models.common.attention import AttentionConfig
from moekit.models.common.rotary import RopeScalingConfig, RotaryConfig
from moekit.models.mixers import RecurrentMixerConfig


def backbone(
    *,
    qkv_bias: bool = False,
    qk_norm: bool = False,
    tied: bool = False,
    gqa: bool = True,
    o_bias: bool = False,
) -> list[Entry]:
    """Embedding, attention (``gqa=False`` leaves q/k/v to the family), block norms, final
    norm and (untied) head."""
    layer, hf = "blocks.{layer}", "model.layers.{layer}"
    entries: list[Entry] = [
        Rename("embed.weight", "model.embed_tokens.weight", layers="none"),
        Rename(f"{layer}.attn_norm.weight", f"{hf}.input_layernorm.weight"),
        Rename(f"{layer}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight"),
        Rename(f"{layer}.attn.o_proj.weight", f"{hf}.self_attn.o_proj.weight"),
        Rename("norm.weight", "model.norm.weight", layers="none"),
    ]
    for proj in ("q_proj", "k_proj", "v_proj") if gqa else ():
        entries.append(Rename(f"{layer}.attn.{proj}.weight", f"{hf}.self_attn.{proj}.weight"))
        if qkv_bias:
            entries.append(Rename(f"{layer}.attn.{proj}.bias", f"{hf}.self_attn.{proj}.bias"))
    if o_bias:
        entries.append(Rename(f"{layer}.attn.o_proj.bias", f"{hf}.self_attn.o_proj.bias"))
    if qk_norm:
        for norm in ("q_norm", "k_norm"):
            entries.append(Rename(f"{layer}.attn.{norm}.weight", f"{hf}.self_attn.{norm}.weight"))
    if not tied:
        entries.append(Rename("lm_head.weight", "lm_head.weight", layers="none"))
    return entries


def gated_in(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF ``(H, D)`` gate and up weights -> moekit ``(D, 2H)`` ``[gate | up]``."""
    return torch.cat([gate.t(), up.t()], dim=1)


def gated_in_split(w_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = w_in.chunk(2, dim=1)
    return gate.t(), up.t()


def dense_ffn(
    moekit: str,
    hf: str,
    layers: str | tuple[int, ...],
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
) -> list[Entry]:
    """A gated FFN (``FeedForward`` or a shared expert) stored as three HF linears."""
    gate, up, down = names
    return [
        Joined(
            f"{moekit}.w_in_DH",
            (f"{hf}.{gate}.weight", f"{hf}.{up}.weight"),
            join=gated_in,
            split=gated_in_split,
            layers=layers,
        ),
        Rename(
            f"{moekit}.w_out_HD",
            f"{hf}.{down}.weight",
            lambda w: w.t(),
            lambda w: w.t(),
            layers=layers,
        ),
    ]


def routed_experts(
    hf_experts: str,
    names=("gate_proj", "up_proj", "down_proj"),
    prefix: str = "blocks.{layer}.ffn.experts",
) -> dict:
    """Per-expert (checkpoint) and stacked (in-memory) layouts of a routed expert bank
    (``prefix``: the moekit bank's name)."""
    gate, up, down = names
    return {
        "checkpoint": [
            Experts(
                f"{prefix}.w_in_EDH",
                (f"{hf_experts}.{{expert}}.{gate}.weight", f"{hf_experts}.{{expert}}.{up}.weight"),
                join=gated_in,
                split=gated_in_split,
            ),
            Experts(
                f"{prefix}.w_out_EHD",
                (f"{hf_experts}.{{expert}}.{down}.weight",),
                join=lambda w: w.t(),
                split=lambda w: (w.t(),),
            ),
        ],
        "stacked": [
            Experts(
                f"{prefix}.w_in_EDH",
                (f"{hf_experts}.gate_up_proj",),
                join=lambda t: t.transpose(1, 2),
                split=lambda w: (w.transpose(1, 2),),
            ),
            Experts(
                f"{prefix}.w_out_EHD",
                (f"{hf_experts}.down_proj",),
                join=lambda t: t.transpose(1, 2),
                split=lambda w: (w.transpose(1, 2),),
            ),
        ],
    }


def partial_rotary_factor(hf: dict[str, Any]) -> float:
    """The rotated share of each head (``rope_parameters`` or top level; 1.0 when unset)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    return float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor")) or 1.0)


def rope(hf: dict[str, Any], default: float = 10000.0, partial: bool = False) -> tuple[float, Any]:
    """``(rope_theta, RopeScalingConfig or None)``; default and YaRN rotary positions.
    ``partial``: the family rotates part of each head (else a partial factor is refused)."""

    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", default)))
    kind = params.get("rope_type", params.get("type", "default"))
    if not partial and partial_rotary_factor(hf) != 1.0:
        raise ValueError(
            f"rope partial_rotary_factor={partial_rotary_factor(hf)} is not supported by this "
            "family's import (its transformers code rotates the whole head)"
        )
    if kind in ("default", None):
        return theta, None
    if kind == "llama3":
        return theta, RopeScalingConfig(
            kind="llama3",
            factor=float(params["factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
        )
    if kind != "yarn":
        raise ValueError(
            f"rope_parameters.rope_type={kind!r} (rope scaling) is not supported yet (default, "
            "yarn and llama3 are)"
        )
    return theta, RopeScalingConfig(
        factor=float(params["factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


# HF keys read by :func:`attention_fields` and :func:`rope` (plus the dense FFN width).
ATTENTION_HF_FIELDS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rope_theta",
        "rope_parameters",
        "rope_scaling",
        "rms_norm_eps",
        "tie_word_embeddings",
        "intermediate_size",
    }
)


def softmax_attention(config: Any, family: str) -> AttentionConfig:
    """``config.attention`` when it is softmax attention; a family that has no latent attention
    or mixture of heads refuses the others by name."""
    attention = config.attention
    if not isinstance(attention, AttentionConfig):
        raise ValueError(
            f"{family} export needs softmax attention (attention.kind='attention'), got "
            f"attention.kind={attention.kind!r}"
        )
    return attention


def rotated_share(attention: AttentionConfig) -> float:
    """The share of each head that rotates (``partial_rotary_factor``; 1.0 without RoPE)."""
    return 1.0 if attention.rope is None else attention.rope.partial_factor


def rope_to_hf(config, rope: RotaryConfig | None = None) -> dict[str, Any]:
    """Rotary parameters (``rope``, default the model attention's) written explicitly, so no
    family fills in its own default (GPT-OSS defaults to YaRN when none are given)."""
    rope = rope or config.attention.rope or RotaryConfig()
    scaling, theta = rope.scaling, rope.theta
    partial = {} if rope.partial_factor == 1.0 else {"partial_rotary_factor": rope.partial_factor}
    if scaling is None:
        params = {"rope_type": "default", "rope_theta": theta, **partial}
        return {"rope_theta": theta, "rope_scaling": params, "rope_parameters": params, **partial}
    if scaling.kind == "llama3":
        params = {
            "rope_type": "llama3",
            "rope_theta": theta,
            "factor": scaling.factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            **partial,
        }
        return {"rope_theta": theta, "rope_scaling": params, "rope_parameters": params, **partial}
    params = {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": scaling.factor,
        "original_max_position_embeddings": scaling.original_max_position_embeddings,
        "beta_fast": scaling.beta_fast,
        "beta_slow": scaling.beta_slow,
        "mscale": scaling.mscale,
        "mscale_all_dim": scaling.mscale_all_dim,
        "truncate": scaling.truncate,
        **partial,
    }
    if scaling.attention_factor is not None:
        params["attention_factor"] = scaling.attention_factor
    return {"rope_theta": theta, "rope_scaling": params, "rope_parameters": params, **partial}


def attention_fields(
    hf: dict[str, Any],
    *,
    rotary: bool = True,
    partial_factor: float | None = None,
    **attention_options: Any,
) -> dict[str, Any]:
    """The ``TransformerConfig`` keywords every Llama-style family reads the same way: the
    shape, the norms and an ``attention`` config (heads, rotary positions) to which
    ``attention_options`` (the family's biases, norms, windows, sinks) are added.
    ``rotary=False``: no positions (NoPE); ``partial_factor``: the share of each head the
    family rotates (``None``: the whole head, and a ``partial_rotary_factor`` is refused)."""

    heads = hf["num_attention_heads"]
    theta, scaling = rope(hf, partial=partial_factor is not None)
    return dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        attention=AttentionConfig(
            n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim"),  # None: d_model // n_heads, as transformers does
            rope=RotaryConfig(theta=theta, scaling=scaling, partial_factor=partial_factor or 1.0)
            if rotary
            else None,
            **attention_options,
        ),
        max_seq_len=hf.get("max_position_embeddings", 4096),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def attention_to_hf(config) -> dict[str, Any]:
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.attention.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_width,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        **rope_to_hf(config),
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": "float32",
    }


def moe_layer(config: Any, family: str) -> Any:
    """The ``MoEConfig`` of ``config``'s MoE blocks; a dense config cannot be exported as an MoE
    family."""
    if config.moe.layer is None:
        raise ValueError(f"{family} export needs MoE layers (the config's moe.layer is None)")
    return config.moe.layer


def attention_and_recurrent_blocks(config: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A hybrid's ``(attention blocks, recurrent blocks)`` (key maps list each kind's)."""
    blocks = range(config.n_layers)
    attention = tuple(i for i in blocks if config.is_attention_layer(i))
    recurrent = tuple(
        i for i in blocks if i not in attention and config.token_mixer_of_layer(i) is not None
    )
    return attention, recurrent


def time_step_limits(hf: dict[str, Any]) -> tuple[float, float]:
    """Mamba2's ``time_step_limit`` ``(low, high)`` as ``Mamba2Config``'s ``(dt_min, dt_max)``
    (``dt_max = 0``: no upper limit, for an infinite ``high``)."""
    low, high = hf.get("time_step_limit") or (0.0, math.inf)
    return float(low), 0.0 if math.isinf(high) else float(high)


def time_step_limit_to_hf(mixer: Any) -> list[float]:
    """``Mamba2Config``'s ``dt_min``/``dt_max`` as HF's ``time_step_limit``."""
    return [mixer.dt_min, mixer.dt_max or math.inf]


def recurrent_mixer(config: Any, kind: type, family: str) -> Any:
    """The one recurrent token mixer config of ``kind`` a hybrid family's blocks use (found by
    class, whatever the pattern calls it), or ``None`` for an attention-only model. A family has
    one config for all its recurrent blocks: another kind, or two different configs, is refused
    by name."""
    layout = getattr(config, "token_mixers", None)
    if layout is None:
        return None
    used = {layout.name_of_layer(i) for i in range(config.n_layers)}
    mixers = [  # the recurrent ones (attention variants are not this helper's)
        m for n in sorted(used) if isinstance(m := layout.mixers.get(n), RecurrentMixerConfig)
    ]
    foreign = sorted({type(m).__name__ for m in mixers if not isinstance(m, kind)})
    if foreign:
        raise ValueError(
            f"a {family} model mixes attention with {kind.__name__} blocks only; this one has "
            + ", ".join(foreign)
        )
    distinct = [m for i, m in enumerate(mixers) if m not in mixers[:i]]
    if len(distinct) > 1:
        raise ValueError(f"a {family} model has one {kind.__name__} for every recurrent block")
    return distinct[0] if distinct else None


def text_model_state(
    state: dict[str, torch.Tensor], prefix: str, left_out: dict[str, str], family: str
) -> dict[str, torch.Tensor]:
    """The text model's tensors of a multimodal checkpoint: ``prefix`` (``model.language_model.``)
    becomes ``model.``, the tensors under ``left_out``'s prefixes are dropped, and a warning
    names what was left out with its parameter count."""
    kept: dict[str, torch.Tensor] = {}
    dropped: dict[str, int] = {}
    for key, value in state.items():
        part = next((p for p in left_out if key.startswith(p)), None)
        if part is not None:
            dropped[left_out[part]] = dropped.get(left_out[part], 0) + value.numel()
            continue
        kept["model." + key[len(prefix) :] if key.startswith(prefix) else key] = value
    if dropped:
        parts = [f"{what} ({n:,} parameters)" for what, n in dropped.items()]
        warnings.warn(
            f"loaded the text model of this {family} checkpoint; left out " + ", ".join(parts),
            stacklevel=4,
        )
    return kept
