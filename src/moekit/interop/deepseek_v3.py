"""DeepSeek-V3 <-> moekit: multi-head latent attention, sigmoid scores with a selection-only
correction bias, group-limited top-k (top-2-sum group scores), renormalised weights times
``routed_scaling_factor``, ungated shared experts of ``n_shared_experts * moe_intermediate_size``,
dense FFNs in the first ``first_k_dense_replace`` blocks, optional YaRN rotary scaling.
"""

from __future__ import annotations

from typing import Any, cast

from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.experts.shared import SharedExpertConfig
from moekit.interop import common
from moekit.interop.expressible import HFFields, any_value, check_hf_config
from moekit.interop.keymap import Entry, Rename
from moekit.layers import MoEConfig
from moekit.losses.config import AuxLossConfig
from moekit.models.common.mla import MLAConfig
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import Gating, GroupScore, TopKRouterConfig

MODEL_TYPE = "deepseek_v3"


def moe_entries(config: TransformerConfig, bias: bool = True) -> list[Entry]:
    """The DeepSeek-style FFN entries other families share (dots.llm1, GLM-4.5): router and
    (``bias``) its selection bias, dense FFNs, shared experts; the routed experts come from
    ``common.routed_experts``."""
    mlp = "model.layers.{layer}.mlp"
    entries: list[Entry] = [
        Rename("blocks.{layer}.ffn.router.weight_ED", f"{mlp}.gate.weight", layers="moe"),
        *common.dense_ffn("blocks.{layer}.ffn", mlp, layers="dense"),
    ]
    if bias:
        entries.append(
            Rename(
                "blocks.{layer}.ffn.router.expert_bias_E",
                f"{mlp}.gate.e_score_correction_bias",
                layers="moe",
            )
        )
    layer = config.moe.layer
    if layer is not None and layer.shared_experts is not None:
        entries += common.dense_ffn(
            "blocks.{layer}.ffn.shared_experts.ffn", f"{mlp}.shared_experts", layers="moe"
        )
    return entries


def moe_layer_from_hf(hf: dict[str, Any], family: str, v2: bool = False) -> MoEConfig:
    """The MoE layer of a DeepSeek-style config: sigmoid scores with a selection-only bias and
    top-2-sum groups (V3, dots.llm1, GLM-4.5), or V2's softmax with best-score groups; shared
    experts of ``n_shared_experts * moe_intermediate_size`` (none when 0)."""
    experts = hf.get("n_routed_experts") or hf["num_local_experts"]
    shared = (hf.get("n_shared_experts") or 0) * hf["moe_intermediate_size"]
    return MoEConfig(
        num_experts=experts,
        top_k=hf["num_experts_per_tok"],
        experts=ExpertConfig(hidden=hf["moe_intermediate_size"]),
        router=TopKRouterConfig(
            gating=Gating.SOFTMAX_TOPK if v2 else Gating.SIGMOID_TOPK,
            normalize_weights=bool(hf.get("norm_topk_prob", not v2)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            num_groups=hf.get("n_group") or 1,
            topk_groups=hf.get("topk_group") or 1,
            group_score=GroupScore.MAX if v2 else GroupScore.TOP2_SUM,
            bias_balancing=not v2,
        ),
        shared_experts=SharedExpertConfig(hidden=shared) if shared else None,
        aux_loss=AuxLossConfig(switch=0.0),  # balanced with the bias
    )


def moe_layer_to_hf(config: TransformerConfig) -> dict[str, Any]:
    """The HF keys of :func:`moe_layer_from_hf`'s layer and its placement."""
    moe = common.moe_layer(config, "DeepSeek-style")
    router = cast(TopKRouterConfig, moe.router)
    shared = moe.shared_experts
    return {
        "intermediate_size": config.ffn_hidden,
        "moe_intermediate_size": moe.experts.hidden,
        "n_routed_experts": moe.num_experts,
        "n_shared_experts": 0 if shared is None else shared.hidden // moe.experts.hidden,
        "num_experts_per_tok": moe.top_k,
        "first_k_dense_replace": config.moe.first_dense,
        "norm_topk_prob": router.normalize_weights,
        "routed_scaling_factor": router.routed_scaling_factor,
        "n_group": router.num_groups,
        "topk_group": router.topk_groups,
    }


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    attn, hf = "blocks.{layer}.attn", "model.layers.{layer}.self_attn"
    mlp = "model.layers.{layer}.mlp"
    latent = [
        Rename(f"{attn}.kv_a_proj.weight", f"{hf}.kv_a_proj_with_mqa.weight"),
        Rename(f"{attn}.kv_a_norm.weight", f"{hf}.kv_a_layernorm.weight"),
        Rename(f"{attn}.kv_b_proj.weight", f"{hf}.kv_b_proj.weight"),
    ]
    if isinstance(config.attention, MLAConfig) and config.attention.q_lora_rank:
        latent += [
            Rename(f"{attn}.q_a_proj.weight", f"{hf}.q_a_proj.weight"),
            Rename(f"{attn}.q_a_norm.weight", f"{hf}.q_a_layernorm.weight"),
            Rename(f"{attn}.q_b_proj.weight", f"{hf}.q_b_proj.weight"),
        ]
    else:
        latent.append(Rename(f"{attn}.q_proj.weight", f"{hf}.q_proj.weight"))
    layer = config.moe.layer
    base = [
        *common.backbone(tied=config.tie_embeddings, gqa=False),
        *latent,
        *moe_entries(
            config, bias=layer is not None and getattr(layer.router, "bias_balancing", False)
        ),
    ]
    experts = common.routed_experts(f"{mlp}.experts")
    return {name: [*base, *entries] for name, entries in experts.items()}


HF_FIELDS = HFFields(
    mapped=common.ATTENTION_HF_FIELDS
    | {
        "first_k_dense_replace",
        "kv_lora_rank",
        "moe_intermediate_size",
        "n_group",
        "n_routed_experts",
        "num_local_experts",
        "n_shared_experts",
        "norm_topk_prob",
        "num_experts_per_tok",
        "q_lora_rank",
        "qk_head_dim",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "rope_interleave",
        "routed_scaling_factor",
        "topk_group",
        "v_head_dim",
    },
    fixed={
        "hidden_act": ("silu",),
        "attention_bias": (False,),
        "pretraining_tp": (1,),
        "topk_method": ("noaux_tc",),
        "scoring_func": ("sigmoid",),
        "moe_layer_freq": (1,),  # an MoE in every block after the dense ones
        "ep_size": (any_value,),
        "aux_loss_alpha": (any_value,),
        "seq_aux": (any_value,),
    },
)


V2_HF_FIELDS = HFFields(
    mapped=HF_FIELDS.mapped - {"norm_topk_prob", "rope_interleave"},
    fixed={
        **{k: v for k, v in HF_FIELDS.fixed.items() if k not in ("topk_method", "scoring_func")},
        "topk_method": ("greedy", "group_limited_greedy"),
        "scoring_func": ("softmax",),
        # transformers' DeepSeek-V2 never renormalises the top-k weights, whatever this says
        "norm_topk_prob": (any_value,),
        "mlp_bias": (False,),
        # V2 rotates complex pairs: the interleaved layout
        "rope_interleave": (True, None),
    },
)


def config_from_hf(hf: dict[str, Any], strict: bool = True, v2: bool = False) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only).

    ``v2``: DeepSeek-V2's router instead (softmax scores, group-limited by each group's best
    score, no correction bias, no renormalisation: ``moekit.interop.deepseek_v2``).
    """
    family = "DeepSeek-V2" if v2 else "DeepSeek-V3"
    check_hf_config(hf, family, V2_HF_FIELDS if v2 else HF_FIELDS, strict)
    if not hf.get("n_shared_experts"):
        raise ValueError(f"{family} import expects n_shared_experts >= 1")
    experts = hf.get("n_routed_experts") or hf["num_local_experts"]
    fields = common.attention_fields({**hf, "head_dim": hf["qk_rope_head_dim"]})
    fields["attention"] = MLAConfig(
        n_heads=hf["num_attention_heads"],
        rope=fields["attention"].rope,
        q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        rope_interleave=bool(hf.get("rope_interleave", True)),
    )
    return TransformerConfig(
        **fields,
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.SWIGLU,
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=experts,
                top_k=hf["num_experts_per_tok"],
                experts=ExpertConfig(hidden=hf["moe_intermediate_size"]),
                router=TopKRouterConfig(
                    gating=Gating.SOFTMAX_TOPK if v2 else Gating.SIGMOID_TOPK,
                    normalize_weights=False if v2 else bool(hf.get("norm_topk_prob", True)),
                    routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                    num_groups=hf.get("n_group") or 1,
                    topk_groups=hf.get("topk_group") or 1,
                    group_score=GroupScore.MAX if v2 else GroupScore.TOP2_SUM,
                    bias_balancing=not v2,
                ),
                shared_experts=SharedExpertConfig(
                    hidden=hf["n_shared_experts"] * hf["moe_intermediate_size"]
                ),
                aux_loss=AuxLossConfig(switch=0.0),  # DeepSeek-V3 balances with the bias
            ),
            first_dense=hf.get("first_k_dense_replace", 0),
        ),
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    moe = config.moe.layer
    mla = config.attention if isinstance(config.attention, MLAConfig) else None
    missing = [
        what
        for what, absent in (
            ("latent attention (attention.kind='mla')", mla is None),
            ("MoE layers (moe.layer)", moe is None),
            (
                "shared experts (moe.layer.shared_experts)",
                moe is None or moe.shared_experts is None,
            ),
        )
        if absent
    ]
    if missing or moe is None or mla is None or moe.shared_experts is None:
        raise ValueError(
            "a DeepSeek-V3 model has latent attention, MoE layers and shared experts; this one "
            "has no " + ", no ".join(missing)
        )
    router = cast(TopKRouterConfig, moe.router)  # export_problems checked the kind
    return {
        **common.attention_to_hf(config),
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": MODEL_TYPE,
        "head_dim": mla.qk_rope_head_dim,
        "intermediate_size": config.ffn_hidden,
        "moe_intermediate_size": moe.experts.hidden,
        "n_routed_experts": moe.num_experts,
        "n_shared_experts": moe.shared_experts.hidden // moe.experts.hidden,
        "num_experts_per_tok": moe.top_k,
        "first_k_dense_replace": config.moe.first_dense,
        "norm_topk_prob": router.normalize_weights,
        "routed_scaling_factor": router.routed_scaling_factor,
        "n_group": router.num_groups,
        "topk_group": router.topk_groups,
        "topk_method": "noaux_tc",
        "q_lora_rank": mla.q_lora_rank or None,
        "kv_lora_rank": mla.kv_lora_rank,
        "qk_nope_head_dim": mla.qk_nope_head_dim,
        "qk_rope_head_dim": mla.qk_rope_head_dim,
        "v_head_dim": mla.v_head_dim,
        "rope_interleave": mla.rope_interleave,
    }
