"""JetMoE (``jetmoe``) <-> moekit: a **mixture of attention heads** (MoA: each token's top-k
attention experts own its query and output projections over shared keys and values,
``moekit.models.common.moa``) and an MoE FFN in every block, both routed top-k on the logits
then softmax over those k, both with a shared output bias. Experts are stored stacked
(``input_linear (E, out, in)``, ``output_linear``), routers as ``router.layer``.
"""

from __future__ import annotations

from typing import Any

from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.interop import common
from moekit.interop.expressible import HFFields, check_hf_config
from moekit.interop.keymap import Entry, Experts, Rename
from moekit.layers import MoEConfig
from moekit.losses.config import AuxLossConfig
from moekit.models.common.moa import MoAConfig
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.common.rotary import RotaryConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import Gating, TopKRouterConfig

MODEL_TYPE = "jetmoe"


def _t(w):
    return w.transpose(-1, -2)


def _t_split(w):
    return (w.transpose(-1, -2),)


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    layer, hf = "blocks.{layer}", "model.layers.{layer}"
    attn = f"{hf}.self_attention"
    entries: list[Entry] = [
        Rename("embed.weight", "model.embed_tokens.weight", layers="none"),
        Rename("norm.weight", "model.norm.weight", layers="none"),
        Rename(f"{layer}.attn_norm.weight", f"{hf}.input_layernorm.weight"),
        Rename(f"{layer}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight"),
        Rename(f"{layer}.attn.kv_proj.weight", f"{attn}.kv_proj.weight"),
        Rename(f"{layer}.attn.router.weight_ED", f"{attn}.experts.router.layer.weight"),
        Rename(f"{layer}.attn.w_q_EDX", f"{attn}.experts.input_linear.weight", _t, _t),
        Rename(f"{layer}.attn.w_o_EXD", f"{attn}.experts.output_linear.weight", _t, _t),
        Rename(f"{layer}.attn.bias_D", f"{attn}.experts.bias"),
        Rename(f"{layer}.ffn.router.weight_ED", f"{hf}.mlp.router.layer.weight", layers="moe"),
        Rename(f"{layer}.ffn.output_bias_D", f"{hf}.mlp.bias", layers="moe"),
        Experts(f"{layer}.ffn.experts.w_in_EDH", (f"{hf}.mlp.input_linear.weight",), _t, _t_split),
        Experts(
            f"{layer}.ffn.experts.w_out_EHD", (f"{hf}.mlp.output_linear.weight",), _t, _t_split
        ),
    ]
    if not config.tie_embeddings:
        entries.append(Rename("lm_head.weight", "lm_head.weight", layers="none"))
    return {"checkpoint": entries}


def _default_eps(value: Any) -> bool:
    """1e-06 (transformers builds the blocks' norms with 1e-06 whatever this says)"""
    return value == 1e-6


HF_FIELDS = HFFields(
    mapped=frozenset(
        {
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_key_value_heads",
            "kv_channels",
            "intermediate_size",
            "max_position_embeddings",
            "num_local_experts",
            "num_experts_per_tok",
            "tie_word_embeddings",
            "rope_parameters",
            "rope_theta",
            "rope_scaling",
            "num_attention_heads",  # derived: k x num_key_value_heads
            "aux_loss_coef",
        }
    ),
    fixed={
        "activation_function": ("silu",),
        "rms_norm_eps": (_default_eps,),
    },
)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""

    check_hf_config(hf, "JetMoE", HF_FIELDS, strict)
    k, experts = hf.get("num_experts_per_tok", 2), hf.get("num_local_experts", 8)
    kv_heads = hf.get("num_key_value_heads", 16)
    theta, scaling = common.rope(hf)
    router = TopKRouterConfig(gating=Gating.TOPK_SOFTMAX)
    return TransformerConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        attention=MoAConfig(
            num_experts=experts,
            top_k=k,
            n_kv_heads=kv_heads,
            head_dim=hf.get("kv_channels", 128),
            rope=RotaryConfig(theta=theta, scaling=scaling),
            aux_loss=AuxLossConfig(switch=hf.get("aux_loss_coef", 0.01) * k),
        ),
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.SWIGLU,
        max_seq_len=hf.get("max_position_embeddings", 4096),
        norm_eps=1e-6,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=experts,
                top_k=k,
                experts=ExpertConfig(hidden=hf["intermediate_size"]),
                router=router,
                output_bias=True,
                aux_loss=AuxLossConfig(switch=hf.get("aux_loss_coef", 0.01) * k),
            )
        ),
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:

    moe = config.moe.layer
    moa = config.attention if isinstance(config.attention, MoAConfig) else None
    if moe is None or moa is None:
        raise ValueError("JetMoE export needs MoE layers and a mixture of attention heads")
    if (moa.num_experts, moa.top_k) != (moe.num_experts, moe.top_k):
        raise ValueError(
            "JetMoE's attention and FFN mixtures share num_local_experts and num_experts_per_tok"
        )
    rope = common.rope_to_hf(config)
    return {
        "architectures": ["JetMoeForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_key_value_heads": config.kv_heads,
        "kv_channels": config.head_width,
        "intermediate_size": moe.experts.hidden,
        "max_position_embeddings": config.max_seq_len,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "aux_loss_coef": moe.aux_loss.switch / moe.top_k,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_parameters": rope["rope_parameters"],
        "rms_norm_eps": 1e-6,
        "activation_function": "silu",
        "torch_dtype": "float32",
        "num_attention_heads": config.attention.n_heads,
    }
