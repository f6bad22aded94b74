"""Padded batches: an attention mask with correct positions, parity with transformers, and
batched generation from prompts of different lengths."""

import dataclasses

import pytest
import torch

from moekit.models import TransformerConfig, TransformerLM, generate
from moekit.models.common.attention import AttentionConfig
from moekit.models.common.mla import MLAConfig
from tests.builders import placement

BASE = TransformerConfig(
    vocab_size=50,
    d_model=32,
    n_layers=2,
    attention=AttentionConfig(n_heads=4, n_kv_heads=2),
    ffn_hidden=48,
    max_seq_len=64,
    moe=placement(32, num_experts=4, top_k=2, expert_hidden=24),
)
VARIANTS = {
    "gqa": BASE,
    "window_and_sinks": dataclasses.replace(
        BASE, attention=dataclasses.replace(BASE.attention, sliding_window=3, sinks=True)
    ),
    "window": dataclasses.replace(
        BASE, attention=dataclasses.replace(BASE.attention, sliding_window=3)
    ),
    "mla": dataclasses.replace(
        BASE,
        attention=MLAConfig(
            n_heads=4, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8
        ),
    ),
}
LENGTHS = (7, 4, 1)


def _model(name: str) -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(VARIANTS[name]).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "sinks" in n or "router" in n:
                p.normal_(std=1.0)
    return model


def _prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(1, 50, (n,), generator=g) for n in LENGTHS]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_padded_batch_equals_each_sequence_alone(name, side):
    model, prompts = _model(name), _prompts()
    S = max(LENGTHS)
    tokens = torch.zeros(len(prompts), S, dtype=torch.long)
    mask = torch.zeros(len(prompts), S, dtype=torch.bool)
    for i, p in enumerate(prompts):
        cols = slice(S - len(p), S) if side == "left" else slice(0, len(p))
        tokens[i, cols], mask[i, cols] = p, True
    with torch.no_grad():
        batched = model(tokens, attention_mask=mask).logits
        for i, p in enumerate(prompts):
            alone = model(p.unsqueeze(0)).logits[0]
            torch.testing.assert_close(batched[i][mask[i]], alone, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(batched).all()


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name", ["gqa", "window_and_sinks", "mla"])
def test_batched_generation_from_prompts_of_different_lengths(name, use_cache):
    model, prompts = _model(name), _prompts()
    batched = generate(model, prompts, 6, use_cache=use_cache)
    assert isinstance(batched, list)
    for p, row in zip(prompts, batched, strict=True):
        alone = generate(model, p, 6, use_cache=use_cache)
        assert torch.equal(row, alone)


def test_attention_mask_errors_name_the_argument():
    model = _model("gqa")
    tokens = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch=2, 5\)"):
        model(tokens, attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask must be bool"):
        model(tokens, attention_mask=torch.ones(2, 5))


def test_left_padded_parity_with_transformers():
    pytest.importorskip("transformers")
    from moekit.interop import from_hf
    from tests.interop.tiny_hf import mixtral as tiny_mixtral

    hf = tiny_mixtral(max_position_embeddings=64)  # vocabulary 64: the prompts use < 50
    ours = from_hf(hf).eval()
    prompts = _prompts()
    S = max(LENGTHS)
    for side in ("left", "right"):
        tokens = torch.zeros(len(prompts), S, dtype=torch.long)
        mask = torch.zeros(len(prompts), S, dtype=torch.long)
        for i, p in enumerate(prompts):
            cols = slice(S - len(p), S) if side == "left" else slice(0, len(p))
            tokens[i, cols], mask[i, cols] = p, 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # what transformers' generate passes
        with torch.no_grad():
            expected = hf(tokens, attention_mask=mask, position_ids=positions).logits
            got = ours(tokens, attention_mask=mask).logits
        real = mask.bool()
        assert (got[real] - expected[real]).abs().max() <= 1e-4
