"""GPT-OSS (OpenAI) <-> moekit.

Router: ``topk(x W + b)`` then softmax over the k logits. Experts: stacked ``gate_up_proj``
``(E, D, 2I)`` with gate and up **interleaved** along the last dimension (gate = even columns),
biases on both projections, and the clamped SwiGLU ``(clamp(up, ±7) + 1) * g * sigmoid(1.702 g)``
with ``g = min(gate, 7)``. Attention: biases on q/k/v/o, a learned sink logit per head,
sliding-window attention on the even layers, YaRN rotary scaling. The released checkpoints
store experts in MXFP4 (``quantization_config.quant_method = "mxfp4"``: ``gate_up_proj_blocks``
``(E, 2I, D/32, 16)`` uint8 with two e2m1 values per byte and ``gate_up_proj_scales``
``(E, 2I, D/32)`` biased exponents, likewise ``down_proj_*``): they import as a quantised bank
in that very layout (``moekit.experts.quantized``, only the gate/up rows de-interleaved) and
export back to it; unquantised (bf16/fp32) checkpoints import as usual.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.experts.quantized import MXFP4_GROUP, QuantFormat, QuantizationConfig
from moekit.interop import common
from moekit.interop.expressible import HFFields, any_value, check_hf_config, quant_method
from moekit.interop.keymap import Entry, Experts, Rename
from moekit.layers import MoEConfig
from moekit.losses.config import AuxLossConfig
from moekit.models.common.attention import AttentionConfig
from moekit.models.common.layout import ATTENTION, TokenMixerLayout
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import Gating, TopKRouterConfig

MODEL_TYPE = "gpt_oss"


def _deinterleave(gate_up: torch.Tensor) -> torch.Tensor:
    """``[..., g0, u0, g1, u1, ...]`` -> ``[..., g0, g1, ..., u0, u1, ...]``."""
    return torch.cat([gate_up[..., 0::2], gate_up[..., 1::2]], dim=-1)


def _interleave(w: torch.Tensor) -> torch.Tensor:
    gate, up = w.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


def _deinterleave_rows(t: torch.Tensor) -> torch.Tensor:
    """MXFP4 codes or scales ``(E, 2I, ...)``: gate rows (even) first, then up rows."""
    return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)


def _interleave_rows(t: torch.Tensor) -> torch.Tensor:
    gate, up = t.chunk(2, dim=1)
    return torch.stack([gate, up], dim=2).flatten(1, 2)


def _mxfp4_experts(ffn: str, mlp: str) -> list[Entry]:
    """The quantised banks' codes and scales, in GPT-OSS's own layout."""
    entries: list[Entry] = []
    for ours, theirs, rows in (("w_in", "gate_up_proj", True), ("w_out", "down_proj", False)):
        for part, suffix in (("codes", "blocks"), ("scales", "scales")):
            entries.append(
                Experts(
                    f"{ffn}.experts.{ours}_{part}",
                    (f"{mlp}.experts.{theirs}_{suffix}",),
                    join=_deinterleave_rows if rows else (lambda t: t),
                    split=(lambda t: (_interleave_rows(t),)) if rows else (lambda t: (t,)),
                )
            )
    return entries


def _is_mxfp4(config: TransformerConfig) -> bool:
    layer = config.moe.layer
    quantization = None if layer is None else layer.experts.quantization
    return quantization is not None and quantization.format is QuantFormat.MXFP4


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    attn, hf = "blocks.{layer}.attn", "model.layers.{layer}.self_attn"
    mlp, ffn = "model.layers.{layer}.mlp", "blocks.{layer}.ffn"
    backbone = [
        *common.backbone(qkv_bias=True, tied=config.tie_embeddings),
        Rename(f"{attn}.o_proj.bias", f"{hf}.o_proj.bias"),
        Rename(f"{attn}.sinks", f"{hf}.sinks"),
        Rename(f"{ffn}.router.weight_ED", f"{mlp}.router.weight", layers="moe"),
        Rename(f"{ffn}.router.bias_E", f"{mlp}.router.bias", layers="moe"),
    ]
    biases = [
        Experts(
            f"{ffn}.experts.b_in_EH",
            (f"{mlp}.experts.gate_up_proj_bias",),
            join=_deinterleave,
            split=lambda b: (_interleave(b),),
        ),
        Experts(
            f"{ffn}.experts.b_out_ED",
            (f"{mlp}.experts.down_proj_bias",),
            join=lambda t: t,
            split=lambda b: (b,),
        ),
    ]
    if _is_mxfp4(config):
        return {"mxfp4": [*backbone, *_mxfp4_experts(ffn, mlp), *biases]}
    entries = [
        *backbone,
        Experts(
            f"{ffn}.experts.w_in_EDH",
            (f"{mlp}.experts.gate_up_proj",),
            join=_deinterleave,
            split=lambda w: (_interleave(w),),
        ),
        Experts(
            f"{ffn}.experts.w_out_EHD",
            (f"{mlp}.experts.down_proj",),
            join=lambda t: t,
            split=lambda w: (w,),
        ),
        *biases,
    ]
    return {"stacked": entries}


def _window_layout(hf: dict[str, Any], attention: AttentionConfig) -> TokenMixerLayout | None:
    """``layer_types`` as a layer pattern: the ``sliding_attention`` blocks get the windowed
    attention (transformers' default: the even blocks); ``None`` when every block has it."""
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)
    ]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown or len(types) != n:
        raise ValueError(
            f"GPT-OSS layer_types must list 'sliding_attention' or 'full_attention' for each of "
            f"the {n} layers, got {types}"
        )
    if all(t == "sliding_attention" for t in types):
        return None
    pattern = ["sliding" if t == "sliding_attention" else ATTENTION for t in types]
    windowed = dataclasses.replace(attention, sliding_window=hf["sliding_window"])
    return TokenMixerLayout(pattern=pattern, mixers={"sliding": windowed})


HF_FIELDS = HFFields(
    mapped=common.ATTENTION_HF_FIELDS
    | {
        "num_local_experts",
        "num_experts_per_tok",
        "experts_per_token",
        "sliding_window",
        "layer_types",
        "quantization_config",  # MXFP4 experts (checked by check_hf_config)
    },
    fixed={
        "swiglu_limit": (7.0,),
        "swiglu_alpha": (1.702,),
        "attention_bias": (True,),
        "hidden_act": (any_value,),  # GPT-OSS experts use their own clamped SwiGLU
    },
)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "GPT-OSS", HF_FIELDS, strict, quantization=("mxfp4",))
    k = hf.get("num_experts_per_tok") or hf["experts_per_token"]
    quantization = (
        QuantizationConfig(format=QuantFormat.MXFP4, group_size=MXFP4_GROUP)
        if strict and quant_method(hf) == "mxfp4"
        else None
    )
    fields = common.attention_fields(
        {**hf, "rms_norm_eps": hf.get("rms_norm_eps", 1e-5)}, qkv_bias=True, o_bias=True, sinks=True
    )
    layout = _window_layout(hf, fields["attention"]) if hf.get("sliding_window") else None
    if hf.get("sliding_window") and layout is None:  # every block windowed
        fields["attention"].sliding_window = hf["sliding_window"]
    return TransformerConfig(
        **fields,
        token_mixers=layout,
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.SWIGLU_OAI,
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=hf["num_local_experts"],
                top_k=k,
                experts=ExpertConfig(
                    hidden=hf["intermediate_size"],
                    activation=Activation.SWIGLU_OAI,
                    bias=True,
                    quantization=quantization,
                ),
                router=TopKRouterConfig(gating=Gating.TOPK_SOFTMAX, bias=True),
                aux_loss=AuxLossConfig(switch=hf.get("router_aux_loss_coef", 0.9) * k),
            ),
        ),
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    moe = common.moe_layer(config, "GPT-OSS")
    layer_types = [
        "sliding_attention" if config.window_of_layer(i) else "full_attention"
        for i in range(config.n_layers)
    ]
    return {
        **common.attention_to_hf(config),
        "architectures": ["GptOssForCausalLM"],
        "model_type": MODEL_TYPE,
        "intermediate_size": moe.experts.hidden,  # every GPT-OSS layer is MoE
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "experts_per_token": moe.top_k,
        "attention_bias": True,
        "sliding_window": max(map(config.window_of_layer, range(config.n_layers))) or None,
        "layer_types": layer_types,
        "swiglu_limit": 7.0,
        "router_aux_loss_coef": moe.aux_loss.switch / moe.top_k,
        **(
            {
                "quantization_config": {
                    "quant_method": "mxfp4",
                    "modules_to_not_convert": [
                        "model.layers.*.self_attn",
                        "model.layers.*.mlp.router",
                        "model.embed_tokens",
                        "lm_head",
                    ],
                }
            }
            if _is_mxfp4(config)
            else {}
        ),
    }
