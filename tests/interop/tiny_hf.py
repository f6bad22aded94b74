"""Tiny random Hugging Face models of every family the interop tests use (one place)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")


def mixtral(**kw):
    """A tiny random Mixtral model with a decisive router, eval mode."""
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    base.update(kw)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**base)).eval()
    with torch.no_grad():  # make the router decisive so top-k ties cannot flip
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(std=0.5)
    return model


FAMILIES = {
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            shared_expert_intermediate_size=40,
            moe_intermediate_size=24,
            num_experts=4,
            decoder_sparse_step=2,
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(moe_intermediate_size=24, num_experts=4, head_dim=8, norm_topk_prob=True),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(num_experts=4, eos_token_id=None, pad_token_id=None, bos_token_id=None),
    ),
}


def qwen_or_olmoe(name, vocab_size=64, **options):
    """A tiny random Qwen2-MoE, Qwen3-MoE or OLMoE model (``FAMILIES``), eval mode."""
    config_cls, model_cls, extra = FAMILIES[name]
    shape = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
    )
    config = getattr(transformers, config_cls)(**{**shape, **extra, **options})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(std=0.5)
    return model


YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def deepseek_v3(**extra):
    """A tiny random DeepSeek-V3 model, eval mode."""
    extra = {"vocab_size": 64, **extra}
    config = transformers.DeepseekV3Config(
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=128,
        routed_scaling_factor=2.5,
        **extra,
    )
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(std=0.5)
                layer.mlp.gate.e_score_correction_bias.normal_(std=0.1)
    return model


def gpt_oss(**options):
    """A tiny random GPT-OSS model, eval mode."""
    shape = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        max_position_embeddings=128,
    )
    config = transformers.GptOssConfig(**{**shape, **options})
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "sinks" in name or "bias" in name or "router" in name:
                param.normal_(std=0.5)
            if "gate_up_proj" in name and "bias" not in name:
                param.normal_(std=1.0)  # large enough that some gates pass the clamp at 7
    return model
