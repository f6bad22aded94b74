"""Parameter, FLOP and weight-memory accounting for MoE transformers.

Works on moekit configs and models, and on Hugging Face ``config.json`` files of shipped MoE
models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3 with multi-head latent attention,
DBRX, GPT-OSS), read as plain JSON: no ``transformers`` import, no download.

Conventions: *total* counts every stored parameter; *active* counts what one token touches:
everything except the routed experts it was not sent to, embedding and output head included
(the convention of Mistral's and Qwen's model cards). Publishers who count compute rather than
storage (OpenAI for GPT-OSS, DeepSeek, Databricks) leave the input embedding out, since a lookup
is not a matmul: that is ``active_non_embedding``. Forward FLOPs per token are ``2 x`` the
active matmul parameters (output head included, the embedding lookup excluded) plus attention
scores and values over a context of ``context`` tokens, ``2 x n_layers x context x (d_qk + d_v)``,
with ``d_qk`` and ``d_v`` the summed query-key and value widths of all heads.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.experts.activations import Activation
from moekit.interop.dense_llama import MODEL_TYPES as DENSE_MODEL_TYPES
from moekit.interop.hf import CONFIG_PARSERS, check_hf_integers  # as the converters
from moekit.interop.switch_transformers import config_from_hf
from moekit.models.common.attention import AttentionConfig
from moekit.models.common.mla import MLAConfig
from moekit.models.common.moa import MoAConfig
from moekit.models.encoder_decoder.model import EncoderDecoderConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.utils.serialization import read_config_file

BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


@dataclass
class ArchSpec:
    """What counting needs to know about a decoder-only MoE transformer (per-layer numbers)."""

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    tie_embeddings: bool
    attention_per_layer: int
    attention_qk_width: int  # sum over heads of the query/key width (score FLOPs)
    attention_v_width: int  # sum over heads of the value width
    norms_per_layer: int
    final_norm: int
    dense_ffn_layers: int
    dense_ffn_params: int
    moe_layers: int
    num_experts: int
    top_k: int
    expert_params: int
    shared_expert_params: int
    router_params: int
    # routed experts of each MoE layer where they differ (pruned or merged models); None: all
    # layers have num_experts, and router_params is per layer
    experts_per_layer: list[int] | None = None
    lm_head_bias: bool = False
    # attention parameters one token touches, when fewer than stored (mixture of attention heads)
    attention_active_per_layer: int | None = None
    # hybrids: blocks with attention (None: all of them); the other blocks' recurrent token
    # mixers (Gated DeltaNet, Mamba2, short convolutions), their parameters summed, and the
    # per-token FLOPs of their state updates and read-outs
    attention_layers: int | None = None
    attention_norms_per_layer: int = 0  # query/key norms, in attention blocks only
    block_norms: int | None = None  # every block's norms when not n_layers x norms_per_layer
    recurrent_mixer_params: int = 0
    recurrent_state_flops: int = 0
    # decoding state: cached elements per token per attention block (keys and values, or MLA's
    # latent and rotary key), and the recurrent blocks' fixed state per sequence (elements)
    kv_cache_width: int = 0
    recurrent_state_elements: int = 0
    # blocks whose attention is their own (a layout's attention entries: Gemma 4's global
    # layers), outside attention_layers: their parameters and q/k norms, score and value widths
    # (FLOPs) and cached elements per token, summed over those blocks
    other_attention_params: int = 0
    other_attention_widths: int = 0
    other_kv_cache_width: int = 0
    # what some blocks add: sandwich post-norms, a dense FFN beside the MoE with its norms,
    # router input scales (Gemma 4); always active
    extra_norms: int = 0
    beside_ffn_params: int = 0

    def decoding_state_bytes(self, context: int, kv_bytes: float = 2.0) -> dict[str, float]:
        """Bytes of one sequence's decoding state at ``context`` positions: the KV cache (in
        ``kv_bytes`` per element) and the recurrent states (float32, whatever the context)."""
        attention_layers = self.n_layers if self.attention_layers is None else self.attention_layers
        cached = attention_layers * self.kv_cache_width + self.other_kv_cache_width
        return {
            "kv_cache": cached * context * kv_bytes,
            "recurrent_state": self.recurrent_state_elements * 4.0,
        }

    @property
    def total_routed_experts(self) -> int:
        if self.experts_per_layer is None:
            return self.moe_layers * self.num_experts
        return sum(self.experts_per_layer)


@dataclass
class ParamReport:
    """Counts for one architecture. All parameter numbers are plain counts."""

    name: str
    total: int
    active: int
    active_non_embedding: int
    breakdown: dict[str, int]
    active_breakdown: dict[str, int]
    flops_per_token: int
    context: int
    weight_bytes: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def report(spec: ArchSpec, context: int = 4096) -> ParamReport:
    """Totals, active counts, breakdown, forward FLOPs per token and weight memory."""
    embeddings = spec.vocab_size * spec.d_model
    lm_head = 0 if spec.tie_embeddings else spec.vocab_size * (spec.d_model + spec.lm_head_bias)
    attention_layers = spec.n_layers if spec.attention_layers is None else spec.attention_layers
    breakdown = {
        "embeddings": embeddings,
        "lm_head": lm_head,
        "attention": attention_layers * spec.attention_per_layer + spec.other_attention_params,
        "dense_ffn": spec.dense_ffn_layers * spec.dense_ffn_params + spec.beside_ffn_params,
        "routed_experts": spec.total_routed_experts * spec.expert_params,
        "shared_experts": spec.moe_layers * spec.shared_expert_params,
        # router parameters are proportional to the experts they score
        "routers": (
            spec.moe_layers * spec.router_params
            if spec.experts_per_layer is None
            else spec.total_routed_experts * spec.router_params // max(spec.num_experts, 1)
        ),
        "norms": (
            spec.n_layers * spec.norms_per_layer if spec.block_norms is None else spec.block_norms
        )
        + attention_layers * spec.attention_norms_per_layer
        + spec.final_norm
        + spec.extra_norms,
    }
    if spec.recurrent_mixer_params:
        breakdown["recurrent_mixers"] = spec.recurrent_mixer_params
    active_breakdown = dict(breakdown)
    active_breakdown["routed_experts"] = spec.moe_layers * spec.top_k * spec.expert_params
    if spec.attention_active_per_layer is not None:
        active_breakdown["attention"] = (
            attention_layers * spec.attention_active_per_layer + spec.other_attention_params
        )
    total = sum(breakdown.values())
    active = sum(active_breakdown.values())
    head_for_flops = spec.vocab_size * spec.d_model  # tied or not, the output matmul runs
    matmul_active = active - embeddings - lm_head - active_breakdown["norms"] + head_for_flops
    attention_flops = (
        2 * attention_layers * context * (spec.attention_qk_width + spec.attention_v_width)
        + 2 * context * spec.other_attention_widths
        + spec.recurrent_state_flops
    )
    return ParamReport(
        name=spec.name,
        total=total,
        active=active,
        active_non_embedding=active - embeddings,
        breakdown=breakdown,
        active_breakdown=active_breakdown,
        flops_per_token=2 * matmul_active + attention_flops,
        context=context,
        weight_bytes={k: total * b for k, b in BYTES_PER_PARAM.items()},
    )


# ---- moekit models -------------------------------------------------------------------------


def _ffn_params(d_model: int, hidden: int, gated: bool, bias: bool = False) -> int:
    width = 2 * hidden if gated else hidden
    return d_model * width + hidden * d_model + ((width + d_model) if bias else 0)


def _mla_attention(d: int, heads: int, mla: MLAConfig) -> tuple[int, int, int]:
    """Parameters, query-key width and value width of multi-head latent attention."""
    q_head = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    q_rank = mla.q_lora_rank
    q_params = d * q_rank + q_rank + q_rank * heads * q_head if q_rank else d * heads * q_head
    kv_params = (
        d * (mla.kv_lora_rank + mla.qk_rope_head_dim)
        + mla.kv_lora_rank
        + mla.kv_lora_rank * heads * (mla.qk_nope_head_dim + mla.v_head_dim)
    )
    return q_params + kv_params + heads * mla.v_head_dim * d, heads * q_head, heads * mla.v_head_dim


def _gqa_attention_params(attn, d: int, hd: int) -> int:
    """Projections (and biases, output gate, sinks) of grouped-query attention; with
    ``values="keys"`` there is no value projection."""
    q_width, kv_width = attn.n_heads * hd, attn.kv_heads * hd
    projections = 1 if getattr(attn, "values", "projected") == "keys" else 2
    params = 2 * d * q_width + projections * d * kv_width
    params += (q_width + projections * kv_width) if attn.qkv_bias else 0
    if attn.output_gate:  # the query projection also computes the gate
        params += d * q_width + (q_width if attn.qkv_bias else 0)
    return params + (d if attn.o_bias else 0) + (attn.n_heads if attn.sinks else 0)


def _qk_norm_params(attn, hd: int) -> int:
    return {
        "none": 0,
        "head": 2 * hd,
        "head_after_rope": 2 * hd,
        "weightless": 0,
        "full": (attn.n_heads + attn.kv_heads) * hd,
    }[attn.qk_norm]


def _block_extras(config) -> dict[str, int]:
    """The ``ArchSpec`` fields of blocks beyond the uniform formula: their own attention
    configs, sandwich post-norms, a dense FFN beside the MoE (with its four branch norms and
    the router's norm)."""

    d = config.d_model
    out = dict(
        other_attention_params=0,
        other_attention_widths=0,
        other_kv_cache_width=0,
        extra_norms=0,
        beside_ffn_params=0,
    )
    layout = config.token_mixers
    for i in range(config.n_layers):
        variant = None if layout is None else layout.attention_variant_of_layer(i)
        if variant is not None and not isinstance(variant, AttentionConfig):
            raise ValueError(
                f"moekit params counts a block's own attention when it is softmax attention; "
                f"block {i} has attention.kind={variant.kind!r}"
            )
        if variant is not None:
            hd = variant.head_width(d)
            out["other_attention_params"] += _gqa_attention_params(variant, d, hd)
            out["extra_norms"] += _qk_norm_params(variant, hd)
            out["other_attention_widths"] += 2 * variant.n_heads * hd
            out["other_kv_cache_width"] += 2 * variant.kv_heads * hd
    width = (2 if config.norm == "layer" else 1) * d
    if config.norm_position == "sandwich":  # a post-norm per sublayer
        sublayers = sum(
            (config.token_mixer_of_layer(i) is not None) + config.has_channel_mixer(i)
            for i in range(config.n_layers)
        )
        out["extra_norms"] += sublayers * width
    layer = config.moe.layer
    if layer is not None and config.moe.dense_beside:
        moe_blocks = sum(
            config.moe.is_moe_layer(i) and config.has_channel_mixer(i)
            for i in range(config.n_layers)
        )
        gated = Activation(config.activation).is_gated
        out["beside_ffn_params"] = moe_blocks * _ffn_params(d, config.ffn_hidden, gated)
        # four branch norms and the router's norm replace the block's one pre-norm
        out["extra_norms"] += moe_blocks * (3 * width + d)
    return out


def spec_from_moekit(config) -> ArchSpec:
    """An ``ArchSpec`` for a moekit ``TransformerConfig``."""

    gated = Activation(config.activation).is_gated
    layer = config.moe.layer
    moe_layers = sum(config.moe.is_moe_layer(i) for i in range(config.n_layers))
    attn = config.attention
    d, hd = config.d_model, config.head_width
    q_width, kv_width = attn.n_heads * hd, config.kv_heads * hd
    kv_cache_width = 2 * kv_width
    shared = router = experts = num_experts = top_k = 0
    counts = None
    if layer is not None:
        num_experts, top_k = layer.num_experts, layer.top_k
        counts = config.moe.experts_per_layer
        e = layer.experts
        experts = _ffn_params(d, e.hidden, Activation(e.activation).is_gated, e.bias)
        if layer.shared_experts is not None:
            s = layer.shared_experts
            shared = _ffn_params(d, s.hidden, Activation(s.activation).is_gated, s.bias)
            shared += d if s.gated else 0
        router = d + (1 if getattr(layer.router, "bias", False) else 0)  # per expert
        router += 1 if layer.expert_scales else 0
        router += d if getattr(layer.router, "noisy_gating", False) else 0
        router *= layer.routed_choices  # zero-computation experts have router rows too
        if layer.zero_computation is not None:  # constant experts: a vector and a 2-way gate
            router += 3 * d * layer.zero_computation.constant
        shared += d if layer.output_bias else 0  # always applied
    qk_width = v_width = q_width
    attention_active = None
    attention_norms = 0
    if isinstance(attn, MLAConfig):
        attention, qk_width, v_width = _mla_attention(d, attn.n_heads, attn)
        kv_cache_width = attn.kv_lora_rank + attn.qk_rope_head_dim
    elif isinstance(attn, MoAConfig):  # shared keys/values; per-expert query and output
        shared_part = 2 * d * kv_width + attn.num_experts * d + (d if attn.output_bias else 0)
        attention = shared_part + attn.num_experts * 2 * d * kv_width
        attention_active = shared_part + attn.top_k * 2 * d * kv_width
    else:
        attention = _gqa_attention_params(attn, d, hd)
        attention_norms = _qk_norm_params(attn, hd)
    return ArchSpec(
        name="moekit",
        vocab_size=config.vocab_size,
        d_model=d,
        n_layers=config.n_layers,
        tie_embeddings=config.tie_embeddings,
        attention_per_layer=attention,
        attention_qk_width=qk_width,
        attention_v_width=v_width,
        norms_per_layer=2 * d * (2 if config.norm == "layer" else 1),  # LayerNorm: + bias
        block_norms=(2 if config.norm == "layer" else 1)
        * d
        * sum(  # a norm per sublayer; a block may lack one (Nemotron-H)
            (config.token_mixer_of_layer(i) is not None) + config.has_channel_mixer(i)
            for i in range(config.n_layers)
        ),
        attention_norms_per_layer=attention_norms,
        final_norm=d * (2 if config.norm == "layer" else 1),
        dense_ffn_layers=sum(
            config.has_channel_mixer(i) and not config.moe.is_moe_layer(i)
            for i in range(config.n_layers)
        ),
        dense_ffn_params=_ffn_params(d, config.ffn_hidden, gated),
        moe_layers=moe_layers,
        num_experts=num_experts,
        top_k=top_k,
        expert_params=experts,
        shared_expert_params=shared,
        router_params=router,
        experts_per_layer=counts,
        lm_head_bias=config.lm_head_bias,
        attention_active_per_layer=attention_active,
        kv_cache_width=kv_cache_width,
        **_recurrent_mixers(config),
        **_block_extras(config),
    )


def _recurrent_mixers(config) -> dict[str, Any]:
    """The hybrid fields of an ``ArchSpec``: attention blocks, the recurrent mixers' parameters
    (counted on a meta-device build, so exactly what the model stores) and state FLOPs per
    token (each mixer config's ``state_flops_per_token``)."""
    layout = getattr(config, "token_mixers", None)
    if layout is None:
        return {}

    params = flops = state = 0
    for index in range(config.n_layers):
        mixer = layout.mixer_of_layer(index)
        if mixer is None:
            continue
        conv_shape, recurrent_shape = mixer.state_shapes(1, config.d_model)
        state += math.prod(conv_shape) + math.prod(recurrent_shape)
        with torch.device("meta"):
            module = mixer.build(d_model=config.d_model, norm_eps=config.norm_eps)
        params += sum(p.numel() for p in module.parameters())
        flops += mixer.state_flops_per_token(config.d_model)
    return {
        # blocks of the model's attention (a layout's own attention: _block_extras)
        "attention_layers": sum(
            layout.is_attention(i) and layout.attention_variant_of_layer(i) is None
            for i in range(config.n_layers)
        ),
        "recurrent_mixer_params": params,
        "recurrent_state_flops": flops,
        "recurrent_state_elements": state,
    }


def _hf_config_dict(config: dict | str | os.PathLike) -> dict:
    if isinstance(config, dict):
        return config
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no Hugging Face config.json at {config}")
    return read_config_file(path)


def spec_from_hf_config(config: dict | str | os.PathLike) -> ArchSpec:
    """An ``ArchSpec`` from a Hugging Face ``config.json`` (a path, a folder or a dict)."""
    data = _hf_config_dict(config)

    model_type = data.get("model_type")
    if model_type not in CONFIG_PARSERS:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(CONFIG_PARSERS)}"
        )
    source = f"{model_type} config.json"
    check_hf_integers(data, source)
    try:
        parsed = CONFIG_PARSERS[model_type](data, strict=False)
    except KeyError as e:
        raise ValueError(f"{source} lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:  # types and ranges are checked by the moekit config
        raise ValueError(f"{source}: {e}") from None
    if model_type not in DENSE_MODEL_TYPES and parsed.moe.num_experts < 1:
        raise ValueError(
            f"{source}: the number of experts must be >= 1, got {parsed.moe.num_experts}"
        )
    spec = spec_from_moekit(parsed)
    spec.name = model_type
    return spec


def seq2seq_report(config: Any, context: int = 4096, name: str = "moekit") -> ParamReport:
    """Accounting for an encoder–decoder (``EncoderDecoderConfig``): per-stack attention (the
    decoder's self- and cross-attention), one relative position bias per stack, dense FFNs and
    MoE layers where each stack's placement puts them; the shared embedding counted once.
    ``flops_per_token`` is for one encoder token plus one decoder token, attending over
    ``context`` positions in each attention."""

    d, inner = config.d_model, config.n_heads * config.head_dim
    stacks = (
        (config.encoder_moe, config.n_encoder_layers, 1),
        (config.decoder_moe, config.n_decoder_layers, 2),
    )
    dense_ffn = _ffn_params(d, config.ffn_hidden, Activation(config.activation).is_gated)
    breakdown = dict.fromkeys(
        ("embeddings", "lm_head", "attention", "dense_ffn", "routed_experts", "routers", "norms"),
        0,
    )
    breakdown["embeddings"] = config.vocab_size * d
    breakdown["lm_head"] = 0 if config.tie_embeddings else config.vocab_size * d
    active_routed = 0
    attention_flops = 0
    for placement, n_layers, attentions in stacks:
        moe_blocks = placement.moe_layer_indices(n_layers) if placement.layer else []
        breakdown["attention"] += n_layers * attentions * 4 * d * inner
        breakdown["attention"] += config.relative_attention_buckets * config.n_heads
        breakdown["norms"] += n_layers * (1 + attentions) * d + d
        breakdown["dense_ffn"] += (n_layers - len(moe_blocks)) * dense_ffn
        attention_flops += 2 * n_layers * attentions * context * 2 * inner
        layer = placement.layer
        if layer is None:
            continue
        e = layer.experts
        expert = _ffn_params(d, e.hidden, Activation(e.activation).is_gated, e.bias)
        counts = placement.experts_per_layer or [layer.num_experts] * len(moe_blocks)
        breakdown["routed_experts"] += sum(counts) * expert
        bias = 1 if getattr(layer.router, "bias", False) else 0
        breakdown["routers"] += sum(counts) * (d + bias)
        active_routed += len(moe_blocks) * layer.top_k * expert
    active_breakdown = {**breakdown, "routed_experts": active_routed}
    total, active = sum(breakdown.values()), sum(active_breakdown.values())
    embeddings = breakdown["embeddings"]
    matmul_active = active - embeddings - breakdown["lm_head"] - breakdown["norms"]
    matmul_active += config.vocab_size * d  # the output head runs tied or not
    return ParamReport(
        name=name,
        total=total,
        active=active,
        active_non_embedding=active - embeddings,
        breakdown=breakdown,
        active_breakdown=active_breakdown,
        flops_per_token=2 * matmul_active + attention_flops,
        context=context,
        weight_bytes={k: total * b for k, b in BYTES_PER_PARAM.items()},
    )


def count_parameters(source: Any, context: int = 4096) -> ParamReport:
    """Accounting for a moekit model or config (``TransformerConfig``, ``EncoderDecoderConfig``),
    or a Hugging Face config.json (path, folder or dict)."""

    config = getattr(source, "config", source)
    if isinstance(config, TransformerConfig):
        return report(spec_from_moekit(config), context)
    if isinstance(config, EncoderDecoderConfig):
        return seq2seq_report(config, context)
    data = _hf_config_dict(source)
    if data.get("model_type") == "switch_transformers":
        try:
            parsed = config_from_hf(data, strict=False)
        except KeyError as e:
            raise ValueError(
                f"switch_transformers config.json lacks the field {e.args[0]!r}"
            ) from None
        return seq2seq_report(parsed, context, name="switch_transformers")
    return report(spec_from_hf_config(data), context)
