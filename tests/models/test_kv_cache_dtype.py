"""The KV cache's dtype is a choice: a bf16 cache for an fp32 model decodes what the fp32 cache
does, up to bf16 rounding of keys and values."""

from __future__ import annotations

import torch

from tests.builders import tiny_lm


def test_a_bf16_cache_for_an_fp32_model():
    model = tiny_lm().eval()
    tokens = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        logits = {}
        for dtype in (torch.float32, torch.bfloat16):
            cache = model.new_kv_cache(2, 16, dtype=dtype)
            assert cache.keys[0].dtype == dtype
            model(tokens[:, :5], kv_cache=cache)
            logits[dtype] = model(tokens[:, 5:], kv_cache=cache).logits
    assert logits[torch.bfloat16].dtype == torch.float32
    torch.testing.assert_close(logits[torch.bfloat16], logits[torch.float32], rtol=2e-2, atol=2e-2)
    assert not torch.equal(logits[torch.bfloat16], logits[torch.float32])
