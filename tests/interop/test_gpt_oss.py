"""GPT-OSS: top-k-then-softmax router with bias, interleaved gate/up with biases, clamped
SwiGLU, attention sinks, sliding windows on even layers, YaRN, against transformers."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.interop import from_hf, to_hf  # noqa: E402
from moekit.models import generate  # noqa: E402
from tests.interop.tiny_hf import gpt_oss as _hf  # noqa: E402


def test_gpt_oss_round_trip(tmp_path):
    hf = _hf()
    ours = from_hf(hf).eval()
    assert (
        ours.config.activation.value == "swiglu_oai"
        and ours.config.attention.rope.scaling is not None
    )
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
