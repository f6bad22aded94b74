"""GPT-OSS: top-k-then-softmax router with bias, interleaved gate/up with biases, clamped
SwiGLU, attention sinks, sliding windows on even layers, YaRN, against transformers."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.interop import from_hf, to_hf  # noqa: E402
from moekit.models import generate  # noqa: E402


def _hf():
    config = transformers.GptOssConfig(
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
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "sinks" in name or "bias" in name or "router" in name:
                param.normal_(std=0.5)
            if "gate_up_proj" in name and "bias" not in name:
                param.normal_(std=1.0)  # large enough that some gates pass the clamp at 7
    return model


def test_gpt_oss_round_trip(tmp_path):
    hf = _hf()
    ours = from_hf(hf).eval()
    assert ours.config.activation.value == "swiglu_oai" and ours.config.rope_scaling is not None
    assert [ours.config.window_of_layer(i) for i in range(2)] == [4, 0]
    tokens = torch.randint(0, 64, (2, 12))  # longer than the window
    with torch.no_grad():
        expected = hf(tokens).logits
        assert (ours(tokens).logits - expected).abs().max() <= 1e-4
    to_hf(ours, tmp_path / "export", "gpt_oss")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert (reloaded(tokens).logits - expected).abs().max() <= 1e-4


def test_sinks_and_sliding_window_with_kv_cache():
    ours = from_hf(_hf()).eval()
    prompt = torch.randint(0, 64, (2, 3))
    assert torch.equal(generate(ours, prompt, 9), generate(ours, prompt, 9, use_cache=False))
