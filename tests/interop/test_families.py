"""Qwen2-MoE, Qwen3-MoE and OLMoE: import parity, export that transformers reloads, re-import."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.interop import from_hf, to_hf  # noqa: E402
from tests.interop.tiny_hf import FAMILIES  # noqa: E402
from tests.interop.tiny_hf import qwen_or_olmoe as _hf  # noqa: E402


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_round_trip(name, tmp_path):
    hf = _hf(name)
    ours = from_hf(hf).eval()
    tokens = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        expected = hf(tokens).logits
        assert (ours(tokens).logits - expected).abs().max() <= 1e-4
    to_hf(ours, tmp_path / "export", name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    again = from_hf(tmp_path / "export").eval()
    with torch.no_grad():
        assert (reloaded(tokens).logits - expected).abs().max() <= 1e-4
        assert torch.equal(again(tokens).logits, ours(tokens).logits)


def test_qwen2_layout_details():
    ours = from_hf(_hf("qwen2_moe"))
    kinds = [type(b.ffn).__name__ for b in ours.blocks]
    assert kinds == ["FeedForward", "MoE"]  # decoder_sparse_step=2
    moe = ours.blocks[1].ffn
    assert moe.shared_experts.gate is not None and not moe.router.config.normalize_weights
    assert ours.blocks[0].attn.q_proj.bias is not None
