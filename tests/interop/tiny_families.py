"""Tiny random transformers models of the families added for issue 23, each with every option
the family has turned on (built offline, seconds each)."""

import torch
import transformers

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def _build(config_cls, model_cls, **options):
    torch.manual_seed(0)
    config = config_cls(**{**COMMON, **options})
    model = model_cls(config).eval()
    with torch.no_grad():  # zero-initialised biases and buffers would hide mapping mistakes
        for name, tensor in model.state_dict().items():
            if name.endswith(("bias", "e_score_correction_bias")):
                tensor.copy_(torch.randn_like(tensor) * 0.1)
            elif "norm" in name and name.endswith("weight"):  # not all ones
                tensor.copy_(1 + torch.randn_like(tensor) * 0.2)
    return model


def dots1():
    return _build(
        transformers.Dots1Config,
        transformers.Dots1ForCausalLM,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=3,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        attention_bias=True,
        head_dim=16,
    )


def glm4_moe():
    return _build(
        transformers.Glm4MoeConfig,
        transformers.Glm4MoeForCausalLM,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=3,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.5,
        attention_bias=True,
        use_qk_norm=True,
        head_dim=16,
    )


FAMILIES = {"dots1": dots1, "glm4_moe": glm4_moe}


def deepseek_v2(**options):
    shape = dict(
        num_key_value_heads=4,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        topk_method="group_limited_greedy",
        first_k_dense_replace=1,
        routed_scaling_factor=1.5,
        q_lora_rank=12,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
    )
    return _build(
        transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM, **{**shape, **options}
    )


FAMILIES["deepseek_v2"] = deepseek_v2


def hunyuan_v1_moe():
    return _build(
        transformers.HunYuanMoEV1Config,
        transformers.HunYuanMoEV1ForCausalLM,
        intermediate_size=24,
        num_experts=6,
        moe_topk=2,
        attention_bias=True,
        head_dim=16,
    )


FAMILIES["hunyuan_v1_moe"] = hunyuan_v1_moe


def minimax_m2():
    return _build(
        transformers.MiniMaxM2Config,
        transformers.MiniMaxM2ForCausalLM,
        intermediate_size=16,
        num_local_experts=8,
        num_experts_per_tok=3,
        head_dim=16,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000.0,
            "partial_rotary_factor": 0.5,
        },
    )


FAMILIES["minimax_m2"] = minimax_m2


def ernie4_5_moe():
    return _build(
        transformers.Ernie4_5_MoeConfig,
        transformers.Ernie4_5_MoeForCausalLM,
        num_hidden_layers=4,
        intermediate_size=48,
        moe_intermediate_size=16,
        moe_num_experts=8,
        moe_num_shared_experts=2,
        moe_k=3,
        moe_layer_start_index=1,
        moe_layer_end_index=2,
        head_dim=16,
        tie_word_embeddings=True,
    )


FAMILIES["ernie4_5_moe"] = ernie4_5_moe


def _granite(shared: bool):
    config_cls = transformers.GraniteMoeSharedConfig if shared else transformers.GraniteMoeConfig
    model_cls = (
        transformers.GraniteMoeSharedForCausalLM if shared else transformers.GraniteMoeForCausalLM
    )
    extra = {"shared_intermediate_size": 20} if shared else {}
    return _build(
        config_cls,
        model_cls,
        intermediate_size=16,
        num_local_experts=6,
        num_experts_per_tok=2,
        attention_bias=True,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        logits_scaling=8.0,
        attention_multiplier=0.015625,
        **extra,
    )


FAMILIES["granitemoe"] = lambda: _granite(False)
FAMILIES["granitemoeshared"] = lambda: _granite(True)


def phimoe():
    return _build(
        transformers.PhimoeConfig,
        transformers.PhimoeForCausalLM,
        intermediate_size=16,
        num_local_experts=6,
        num_experts_per_tok=2,
        attention_bias=True,
        lm_head_bias=True,
        sliding_window=5,  # shorter than the test's 13 tokens
        router_jitter_noise=0.3,  # a wide threshold: several candidates per round
    )


FAMILIES["phimoe"] = phimoe


def llama4_text():
    return _build(
        transformers.Llama4TextConfig,
        transformers.Llama4ForCausalLM,
        num_hidden_layers=4,
        head_dim=8,
        intermediate_size=16,
        intermediate_size_mlp=24,
        num_local_experts=4,
        num_experts_per_tok=2,
        interleave_moe_layer_step=2,
        no_rope_layers=[1, 0, 1, 0],  # NoPE in blocks 1 and 3
        attention_chunk_size=5,  # chunks shorter than the test's 13 tokens
        floor_scale=3,  # temperature tuning changes within the test's positions
        attn_scale=0.3,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )


FAMILIES["llama4_text"] = llama4_text


def flex_olmo():
    return _build(
        transformers.FlexOlmoConfig,
        transformers.FlexOlmoForCausalLM,
        intermediate_size=16,
        num_experts=6,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        attention_bias=True,
        pad_token_id=None,
        eos_token_id=None,
    )


FAMILIES["flex_olmo"] = flex_olmo


def jetmoe():
    return _build(
        transformers.JetMoeConfig,
        transformers.JetMoeForCausalLM,
        num_key_value_heads=2,
        kv_channels=8,
        intermediate_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )


FAMILIES["jetmoe"] = jetmoe


def lfm2_moe():
    """LFM2-MoE: short convolutions (with biases) and attention, dense first block, sigmoid
    routing with the expert bias."""
    return _build(
        transformers.Lfm2MoeConfig,
        transformers.Lfm2MoeForCausalLM,
        num_hidden_layers=4,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=3,
        num_dense_layers=1,
        use_expert_bias=True,
        routed_scaling_factor=1.5,
        norm_topk_prob=True,
        conv_bias=True,
        conv_L_cache=3,
        layer_types=["conv", "full_attention", "conv", "full_attention"],
    )


FAMILIES["lfm2_moe"] = lfm2_moe


def qwen3_next():
    """Qwen3-Next: Gated DeltaNet (2 key heads, 4 value heads) and gated attention 1:1 here,
    partial rotary, a gated shared expert, MoE every block."""
    return _build(
        transformers.Qwen3NextConfig,
        transformers.Qwen3NextForCausalLM,
        num_hidden_layers=4,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    )


FAMILIES["qwen3_next"] = qwen3_next


def qwen3_5_moe():
    """Qwen3.5-MoE's text model: Gated DeltaNet and gated attention, a gated shared expert."""
    return _build(
        transformers.Qwen3_5MoeTextConfig,
        transformers.Qwen3_5MoeForCausalLM,
        num_hidden_layers=4,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=3,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    )


FAMILIES["qwen3_5_moe"] = qwen3_5_moe


def glm4_moe_lite():
    """GLM-4.7-Flash: latent attention with a query LoRA, DeepSeek-V3's router, dense first."""
    return _build(
        transformers.Glm4MoeLiteConfig,
        transformers.Glm4MoeLiteForCausalLM,
        num_key_value_heads=4,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=3,
        routed_scaling_factor=1.8,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        mlp_layer_types=["dense", "sparse", "sparse"],
    )


FAMILIES["glm4_moe_lite"] = glm4_moe_lite


def granitemoehybrid():
    """Granite-4.0-H: Mamba2 (2 groups, conv bias) and NoPE attention, Granite multipliers, a
    shared FFN; the dt limit on."""
    return _build(
        transformers.GraniteMoeHybridConfig,
        transformers.GraniteMoeHybridForCausalLM,
        num_hidden_layers=4,
        intermediate_size=16,
        shared_intermediate_size=20,
        num_local_experts=6,
        num_experts_per_tok=2,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        logits_scaling=8.0,
        attention_multiplier=0.015625,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        mamba_n_heads=4,
        mamba_n_groups=2,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=8,
        time_step_limit=(0.0, 0.5),
    )


FAMILIES["granitemoehybrid"] = granitemoehybrid


def nemotron_h():
    """Nemotron-H: one-sublayer blocks (Mamba2, MoE, attention, MLP), squared-ReLU experts and
    a shared expert, sigmoid routing with the correction bias in groups."""
    return _build(
        transformers.NemotronHConfig,
        transformers.NemotronHForCausalLM,
        num_hidden_layers=6,
        layers_block_type=[
            "linear_attention",
            "moe",
            "full_attention",
            "mlp",
            "linear_attention",
            "moe",
        ],
        head_dim=8,
        intermediate_size=48,
        ssm_state_size=8,
        mamba_num_heads=4,
        mamba_head_dim=8,
        n_groups=2,
        conv_kernel=4,
        chunk_size=8,
        time_step_limit=(0.0, 0.5),
        n_routed_experts=8,
        n_shared_experts=1,
        moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24,
        num_experts_per_tok=3,
        routed_scaling_factor=2.0,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
    )


FAMILIES["nemotron_h"] = nemotron_h


def jamba():
    """Jamba: Mamba blocks (per-channel, per-state decay; RMSNorms on dt, B and C; conv and
    projection biases) with NoPE attention every 4th block from block 1, a Mixtral-style MoE
    with unnormalised top-k weights every other block, dense SwiGLU elsewhere."""
    return _build(
        transformers.JambaConfig,
        transformers.JambaForCausalLM,
        num_hidden_layers=6,
        intermediate_size=24,
        num_experts=6,
        num_experts_per_tok=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=4,
        attn_layer_offset=1,
        mamba_d_state=6,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=5,
        mamba_conv_bias=True,
        mamba_proj_bias=True,
    )


FAMILIES["jamba"] = jamba


def gemma4():
    """Gemma 4's MoE text model: sliding and global layers (global: wider heads, one key/value
    head, keys as values, proportional rotary positions), a dense GeGLU-tanh FFN beside the MoE
    with their five norms, the router's own norm and scales, layer scalars, soft-capped logits,
    tied embeddings."""
    model = _build(
        transformers.Gemma4TextConfig,
        transformers.Gemma4ForCausalLM,
        num_hidden_layers=4,
        head_dim=8,
        global_head_dim=16,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        intermediate_size=24,
        enable_moe_block=True,
        num_experts=6,
        top_k_experts=2,
        moe_intermediate_size=12,
        hidden_size_per_layer_input=0,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=3.0,
        tie_word_embeddings=True,
    )
    with torch.no_grad():  # the scales that load from a checkpoint, not left at one
        for name, tensor in model.state_dict().items():
            if name.endswith(("layer_scalar", "router.scale", "per_expert_scale")):
                tensor.copy_(1 + torch.randn_like(tensor) * 0.3)
            # experts of a realistic scale: at transformers' init (std 0.02) the MoE branch's
            # output is ~1e-3, and its post-norm scales float32 rounding up to ~1e-5
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                tensor.normal_(0, 0.3)
    return model


FAMILIES["gemma4_text"] = gemma4
