"""The decoder families of issue 23: fp32 logits parity <= 1e-5 with transformers on tiny random
configs with every option on, export that transformers reloads, re-import equal."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.interop import from_hf, to_hf  # noqa: E402
from tests.interop.tiny_families import FAMILIES  # noqa: E402


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_parity_export_reload(name, tmp_path):
    hf = FAMILIES[name]()
    ours = from_hf(hf).eval()
    tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens).logits
    assert (got - expected).abs().max() <= 1e-5, (got - expected).abs().max()
    to_hf(ours, tmp_path / "export", hf.config.model_type)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    again = from_hf(tmp_path / "export").eval()
    with torch.no_grad():
        assert (reloaded(tokens).logits - expected).abs().max() <= 1e-5
        assert torch.equal(again(tokens).logits, got)


# one option each family's transformers code has and moekit does not map: refused by name
REFUSED = {
    "dots1": ("layer_types", ["sliding_attention", "full_attention", "full_attention"]),
    "glm4_moe": ("topk_method", "greedy"),
    "deepseek_v2": ("scoring_func", "sigmoid"),
    "hunyuan_v1_moe": ("moe_topk", [2, 2, 2]),
    "minimax_m2": ("hidden_act", "gelu"),
    "ernie4_5_moe": ("use_bias", True),
    "granitemoe": ("hidden_act", "gelu"),
    "granitemoeshared": ("hidden_act", "gelu"),
    "phimoe": ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}),
    "llama4_text": ("no_rope_layers", [2, 1, 1, 0]),
    "flex_olmo": ("hidden_act", "gelu"),
    "jetmoe": ("activation_function", "gelu"),
    "qwen3_next": ("mlp_only_layers", [1]),
    "qwen3_5_moe": ("decoder_sparse_step", 2),
    "granitemoehybrid": ("position_embedding_type", "alibi"),
    "nemotron_h": ("moe_latent_size", 8),
    "glm4_moe_lite": ("mlp_layer_types", ["sparse", "dense", "sparse"]),
    "lfm2_moe": ("layer_types", ["conv", "sliding_attention", "conv", "full_attention"]),
    "jamba": ("hidden_act", "gelu"),
    "gemma4_text": ("hidden_size_per_layer_input", 8),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unmapped_options_are_refused_by_name(name):
    from moekit.interop.hf import FAMILIES as CONVERTERS
    from moekit.interop.hf import check_hf_integers

    key, value = REFUSED[name]
    config = FAMILIES[name]().config.to_dict()
    config[key] = value
    with pytest.raises(ValueError, match=key):
        check_hf_integers(config, name)
        CONVERTERS[config["model_type"]].config_from_hf(config)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cached_decoding_equals_the_full_forward(name):
    """Every attention option of the new families (partial rotary, q/k norm after the rotation,
    NoPE blocks, chunks, temperature tuning, sliding windows, post-norm, multipliers) under the
    KV cache: one token at a time gives the full forward's logits, and greedy generation
    matches transformers'."""
    from moekit.models.transformer.generate import generate

    hf = FAMILIES[name]()
    ours = from_hf(hf).eval()
    tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(tokens).logits
        cache = ours.new_kv_cache(2, 16)
        steps = [ours(tokens[:, i : i + 1], kv_cache=cache).logits for i in range(13)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    prompt = tokens[:, :5]
    expected = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
    )
    assert torch.equal(generate(ours, prompt, 6), expected)
