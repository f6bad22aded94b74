"""DeepSeek-V3: MLA, grouped sigmoid routing with the correction bias, shared experts, dense
first layers and YaRN, against transformers; MLA's latent KV cache in generation."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.interop import from_hf, to_hf  # noqa: E402
from moekit.models import generate  # noqa: E402
from tests.interop.tiny_hf import YARN  # noqa: E402
from tests.interop.tiny_hf import deepseek_v3 as _hf  # noqa: E402


@pytest.mark.parametrize(
    "extra",
    [dict(q_lora_rank=16), dict(q_lora_rank=None, rope_parameters=YARN)],
    ids=["q_lora", "direct_q_yarn"],
)
def test_deepseek_v3_round_trip(extra, tmp_path):
    hf = _hf(**extra)
    ours = from_hf(hf).eval()
    assert [type(b.ffn).__name__ for b in ours.blocks] == ["FeedForward", "MoE", "MoE"]
    assert ours.blocks[1].ffn.router.expert_bias_E.abs().sum() > 0  # correction bias imported
    tokens = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        expected = hf(tokens).logits
        assert (ours(tokens).logits - expected).abs().max() <= 1e-4
    to_hf(ours, tmp_path / "export", "deepseek_v3")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert (reloaded(tokens).logits - expected).abs().max() <= 1e-4


def test_mla_latent_cache_generation_equals_recompute():
    ours = from_hf(_hf(q_lora_rank=16)).eval()
    prompt = torch.randint(0, 64, (2, 5))
    cached = generate(ours, prompt, 10)
    uncached = generate(ours, prompt, 10, use_cache=False)
    assert torch.equal(cached, uncached)
    cache = ours.new_kv_cache(1)
    assert cache.keys[0].shape == (1, 1, 128, 16)  # the latent, not per-head keys
