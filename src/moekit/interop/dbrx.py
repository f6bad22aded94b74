"""DBRX (Databricks) -> moekit config, for parameter accounting (weights are not converted).

DBRX: grouped-query attention with a fused ``Wqkv`` and no biases, 16 experts, top-4, GLU experts
of ``ffn_hidden_size``, no shared experts, LayerNorm without bias (as many parameters as
RMSNorm). Its ``config.json`` nests attention and FFN options in ``attn_config``/``ffn_config``.
"""

from __future__ import annotations

from typing import Any

from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.interop.expressible import HFFields, any_value, check_hf_config
from moekit.layers import MoEConfig
from moekit.models.common.attention import AttentionConfig
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.common.rotary import RotaryConfig
from moekit.models.transformer.model import TransformerConfig

MODEL_TYPE = "dbrx"

HF_FIELDS = HFFields(
    mapped=frozenset(
        {
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "max_seq_len",
            "attn_config",
            "ffn_config",
            "tie_word_embeddings",
        }
    ),
    fixed={"resid_pdrop": (any_value,), "emb_pdrop": (any_value,)},
)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config with DBRX's shapes."""
    check_hf_config(hf, "DBRX", HF_FIELDS, strict)
    attn, ffn = hf.get("attn_config") or {}, hf["ffn_config"]
    return TransformerConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        n_layers=hf["n_layers"],
        attention=AttentionConfig(
            n_heads=hf["n_heads"],
            n_kv_heads=attn.get("kv_n_heads", hf["n_heads"]),
            rope=RotaryConfig(theta=float(attn.get("rope_theta", 500000.0))),
        ),
        ffn_hidden=ffn["ffn_hidden_size"],
        activation=Activation.SWIGLU,
        max_seq_len=hf.get("max_seq_len", 32768),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=ffn["moe_num_experts"],
                top_k=ffn["moe_top_k"],
                experts=ExpertConfig(hidden=ffn["ffn_hidden_size"]),
            ),
        ),
    )
