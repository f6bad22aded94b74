"""Nemotron-H (NVIDIA, ``nemotron_h``: Nemotron-3-Nano-30B-A3B and kin) <-> moekit. Each HF block
holds one sublayer after one RMSNorm: **Mamba2** (``"linear_attention"``), attention without
positions (``"full_attention"``), a non-gated **squared-ReLU** MLP (``"mlp"``) or an MoE
(``"moe"``: sigmoid scores with a selection-only correction bias, top-2-sum group-limited top-k,
renormalised times ``routed_scaling_factor``, non-gated squared-ReLU experts and a shared expert).

moekit expresses it block for block with ``TokenMixerLayout``: a block's token mixer is Mamba2,
attention or ``"none"``, its channel mixer the FFN/MoE or ``"none"`` (``channel``), so each
moekit block has exactly the HF block's one norm and one sublayer. The Super size's latent MoE
(``moe_latent_size``) and the multi-token-prediction layers are refused by name.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.experts.shared import SharedExpertConfig
from moekit.interop import common
from moekit.interop.expressible import HFFields, any_value, check_hf_config, unset
from moekit.interop.keymap import Entry, Experts, Rename
from moekit.layers import MoEConfig
from moekit.losses.config import AuxLossConfig
from moekit.models.common.attention import AttentionConfig
from moekit.models.common.layout import ATTENTION, FFN, NONE, TokenMixerLayout
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.mixers import Mamba2Config
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import Gating, GroupScore, TopKRouterConfig

MODEL_TYPE = "nemotron_h"
MAMBA = "linear_attention"
_TOKEN = {MAMBA: MAMBA, "full_attention": ATTENTION, "mlp": NONE, "moe": NONE}
# the published checkpoints' ``hybrid_override_pattern``, one character a layer (transformers
# reads it into ``layers_block_type`` the same way)
_PATTERN = {"M": MAMBA, "E": "moe", "*": "full_attention", "-": "mlp"}


def _t(w: torch.Tensor) -> torch.Tensor:
    return w.transpose(-1, -2)


def _t_split(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (w.transpose(-1, -2),)


def block_types(config: TransformerConfig) -> list[str]:
    """The HF ``layers_block_type`` of a moekit config."""
    types = []
    for i in range(config.n_layers):
        if config.is_attention_layer(i):
            types.append("full_attention")
        elif config.token_mixer_of_layer(i) is not None:
            types.append(MAMBA)
        else:
            types.append("moe" if config.moe.is_moe_layer(i) else "mlp")
    return types


def checkpoint_state(hf: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published checkpoints name the model ``backbone``; ``transformers`` renames it
    ``model`` (what ``from_hf`` calls)."""
    prefix = "backbone."
    return {
        ("model." + k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()
    }


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    types = block_types(config)
    by = {t: tuple(i for i, x in enumerate(types) if x == t) for t in set(types)}
    mixer_blocks = by.get(MAMBA, ()) + by.get("full_attention", ())
    channel_blocks = by.get("moe", ()) + by.get("mlp", ())
    hf, ours = "model.layers.{layer}", "blocks.{layer}"
    entries: list[Entry] = [
        Rename("embed.weight", "model.embeddings.weight", layers="none"),
        Rename("norm.weight", "model.norm_f.weight", layers="none"),
        Rename(f"{ours}.attn_norm.weight", f"{hf}.norm.weight", layers=mixer_blocks),
        Rename(f"{ours}.ffn_norm.weight", f"{hf}.norm.weight", layers=channel_blocks),
    ]
    if not config.tie_embeddings:
        entries.append(Rename("lm_head.weight", "lm_head.weight", layers="none"))
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        entries.append(
            Rename(
                f"{ours}.attn.{proj}.weight",
                f"{hf}.mixer.{proj}.weight",
                layers=by.get("full_attention", ()),
            )
        )
    mamba = common.recurrent_mixer(config, Mamba2Config, "Nemotron-H")
    if mamba is not None:
        names = ["in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight"]
        names += ["out_proj.weight"] + (["conv1d.bias"] if mamba.conv_bias else [])
        names += ["in_proj.bias", "out_proj.bias"] if mamba.bias else []
        entries += [
            Rename(f"{ours}.attn.{n}", f"{hf}.mixer.{n}", layers=by.get(MAMBA, ())) for n in names
        ]
    mlp = by.get("mlp", ())
    entries += [
        Rename(f"{ours}.ffn.w_in_DH", f"{hf}.mixer.up_proj.weight", _t, _t, layers=mlp),
        Rename(f"{ours}.ffn.w_out_HD", f"{hf}.mixer.down_proj.weight", _t, _t, layers=mlp),
        Rename(f"{ours}.ffn.router.weight_ED", f"{hf}.mixer.gate.weight", layers="moe"),
        Rename(
            f"{ours}.ffn.router.expert_bias_E",
            f"{hf}.mixer.gate.e_score_correction_bias",
            layers="moe",
        ),
        Rename(
            f"{ours}.ffn.shared_experts.ffn.w_in_DH",
            f"{hf}.mixer.shared_experts.up_proj.weight",
            _t,
            _t,
            layers="moe",
        ),
        Rename(
            f"{ours}.ffn.shared_experts.ffn.w_out_HD",
            f"{hf}.mixer.shared_experts.down_proj.weight",
            _t,
            _t,
            layers="moe",
        ),
    ]
    experts = f"{ours}.ffn.experts"
    layouts = {
        "checkpoint": [
            Experts(
                f"{experts}.w_in_EDH",
                (f"{hf}.mixer.experts.{{expert}}.up_proj.weight",),
                join=_t,
                split=_t_split,
            ),
            Experts(
                f"{experts}.w_out_EHD",
                (f"{hf}.mixer.experts.{{expert}}.down_proj.weight",),
                join=_t,
                split=_t_split,
            ),
        ],
        "stacked": [
            Experts(f"{experts}.w_in_EDH", (f"{hf}.mixer.experts.up_proj",), _t, _t_split),
            Experts(f"{experts}.w_out_EHD", (f"{hf}.mixer.experts.down_proj",), _t, _t_split),
        ],
    }
    return {name: [*entries, *mapped] for name, mapped in layouts.items()}


def _block_types(value: Any) -> bool:
    return value is None or all(t in _TOKEN for t in value)


def _pattern(value: Any) -> bool:
    """one of M, E, * or - per layer"""
    return value is None or (isinstance(value, str) and all(c in _PATTERN for c in value))


def layer_types(hf: dict[str, Any]) -> list[str]:
    """Each layer's type: ``layers_block_type`` (what ``transformers`` writes) or the published
    configs' ``hybrid_override_pattern`` (``M`` Mamba2, ``E`` MoE, ``*`` attention, ``-`` MLP)."""
    types = list(hf.get("layers_block_type") or hf.get("layer_types") or [])
    pattern = hf.get("hybrid_override_pattern")
    if not types and isinstance(pattern, str):
        types = [_PATTERN[c] for c in pattern]
    if not types:
        raise ValueError(
            "a nemotron_h config.json must list layers_block_type (or hybrid_override_pattern)"
        )
    return types


HF_FIELDS = HFFields(
    mapped=frozenset(
        {
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "layers_block_type",
            "hybrid_override_pattern",
            "tie_word_embeddings",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "intermediate_size",
            "ssm_state_size",
            "mamba_num_heads",
            "mamba_head_dim",
            "n_groups",
            "conv_kernel",
            "expand",
            "time_step_limit",
            "use_conv_bias",
            "mamba_proj_bias",
            "n_routed_experts",
            "n_shared_experts",
            "moe_intermediate_size",
            "moe_shared_expert_intermediate_size",
            "num_experts_per_tok",
            "routed_scaling_factor",
            "n_group",
            "topk_group",
            "norm_topk_prob",
            "layer_norm_epsilon",
        }
    ),
    fixed={
        "layers_block_type": (_block_types,),
        "hybrid_override_pattern": (_pattern,),
        "mtp_hybrid_override_pattern": (any_value,),
        "mlp_hidden_act": ("relu2",),
        "mamba_hidden_act": ("silu",),
        "attention_bias": (False,),
        "mlp_bias": (False,),
        "use_bias": (False,),
        "sliding_window": (unset,),
        "moe_latent_size": (unset,),
        "num_nextn_predict_layers": (0, None),
        "mtp_layers_block_type": (any_value,),
        "num_logits_to_keep": (any_value,),
        "use_mamba_kernels": (any_value,),
        "time_step_min": (any_value,),  # initialisation only
        "time_step_max": (any_value,),
        "time_step_floor": (any_value,),
        "mamba_ssm_cache_dtype": (any_value,),
        "residual_in_fp32": (any_value,),
        "rescale_prenorm_residual": (any_value,),
        "moe_shared_expert_overlap": (any_value,),
        "mamba_chunk_size": (any_value,),
        "chunk_size": (any_value,),
        "attention_dropout": (any_value,),
        # in the published config.json, not read by transformers: its norms use
        # layer_norm_epsilon, and its attention has no rotary positions
        "norm_eps": (any_value,),
        "rope_theta": (any_value,),
        "hidden_dropout": (any_value,),
    },
)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> TransformerConfig:
    """The moekit config of an HF ``config.json`` (``strict=False``: accounting only)."""
    check_hf_config(hf, "Nemotron-H (nemotron_h)", HF_FIELDS, strict)
    types = layer_types(hf)
    dt_min, dt_max = common.time_step_limits(hf)
    mamba = Mamba2Config(
        n_heads=hf["mamba_num_heads"],
        head_dim=hf["mamba_head_dim"],
        state_dim=hf["ssm_state_size"],
        n_groups=hf.get("n_groups", 8),
        conv_width=hf.get("conv_kernel", 4),
        conv_bias=bool(hf.get("use_conv_bias", True)),
        bias=bool(hf.get("mamba_proj_bias", False)),
        dt_min=dt_min,
        dt_max=dt_max,
    )
    pattern = [_TOKEN[t] for t in types]
    channel = [FFN if t in ("mlp", "moe") else NONE for t in types]
    heads = hf["num_attention_heads"]
    k = hf["num_experts_per_tok"]
    return TransformerConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=len(types),
        attention=AttentionConfig(
            n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim"),
            rope=None,
        ),
        ffn_hidden=hf["intermediate_size"],
        activation=Activation.RELU2,
        max_seq_len=hf.get("max_position_embeddings", 4096),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=hf["n_routed_experts"],
                top_k=k,
                experts=ExpertConfig(
                    hidden=hf["moe_intermediate_size"], activation=Activation.RELU2
                ),
                router=TopKRouterConfig(
                    gating=Gating.SIGMOID_TOPK,
                    normalize_weights=bool(hf.get("norm_topk_prob", True)),
                    routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                    num_groups=hf.get("n_group") or 1,
                    topk_groups=hf.get("topk_group") or 1,
                    group_score=GroupScore.TOP2_SUM,
                    bias_balancing=True,
                ),
                shared_experts=SharedExpertConfig(
                    hidden=hf["moe_shared_expert_intermediate_size"],
                    activation=Activation.RELU2,
                )
                if hf.get("n_shared_experts", 1)
                else None,
                aux_loss=AuxLossConfig(switch=0.0),  # balanced by the correction bias
            ),
            layers=[i for i, t in enumerate(types) if t == "moe"] or None,
        ),
        token_mixers=TokenMixerLayout(
            pattern=pattern,
            mixers={MAMBA: mamba} if MAMBA in pattern else {},
            channel=channel,
        ),
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    layout = config.token_mixers
    moe = config.moe.layer
    if layout is None or moe is None:
        raise ValueError("a Nemotron-H model lists its blocks (token_mixers) and has MoE layers")
    for i in range(config.n_layers):
        if (config.token_mixer_of_layer(i) is None) == (not config.has_channel_mixer(i)):
            raise ValueError(
                f"block {i} has {'both' if config.has_channel_mixer(i) else 'neither'} a token "
                "and a channel mixer; a Nemotron-H block holds exactly one sublayer"
            )
    router = cast(TopKRouterConfig, moe.router)
    mamba = common.recurrent_mixer(config, Mamba2Config, "Nemotron-H") or Mamba2Config()
    shared = moe.shared_experts
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "layers_block_type": block_types(config),
        "tie_word_embeddings": config.tie_embeddings,
        "num_attention_heads": config.attention.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_width,
        "max_position_embeddings": config.max_seq_len,
        "intermediate_size": config.ffn_hidden,
        "mlp_hidden_act": "relu2",
        "layer_norm_epsilon": config.norm_eps,
        "ssm_state_size": mamba.state_dim,
        "mamba_num_heads": mamba.n_heads,
        "mamba_head_dim": mamba.head_dim,
        "n_groups": mamba.n_groups,
        "conv_kernel": mamba.conv_width,
        "use_conv_bias": mamba.conv_bias,
        "mamba_proj_bias": mamba.bias,
        "time_step_limit": common.time_step_limit_to_hf(mamba),
        "n_routed_experts": moe.num_experts,
        "n_shared_experts": 0 if shared is None else 1,
        "moe_intermediate_size": moe.experts.hidden,
        "moe_shared_expert_intermediate_size": 0 if shared is None else shared.hidden,
        "num_experts_per_tok": moe.top_k,
        "routed_scaling_factor": router.routed_scaling_factor,
        "n_group": router.num_groups,
        "topk_group": router.topk_groups,
        "norm_topk_prob": router.normalize_weights,
        "torch_dtype": "float32",
    }
