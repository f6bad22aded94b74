"""Packed sequences (segment_ids): each document in a row computes what it computes alone."""

import pytest
import torch

from moekit.models import TransformerConfig, TransformerLM
from moekit.models.common.attention import AttentionConfig
from moekit.models.common.mla import MLAConfig
from tests.builders import placement


@pytest.mark.parametrize("variant", ["gqa_window", "mla"])
def test_each_packed_document_equals_the_document_alone(variant):
    torch.manual_seed(0)
    attention = (
        AttentionConfig(n_heads=2, n_kv_heads=1, sliding_window=4)
        if variant == "gqa_window"
        else MLAConfig(
            n_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8
        )
    )
    model = TransformerLM(
        TransformerConfig(
            vocab_size=50,
            d_model=16,
            n_layers=2,
            attention=attention,
            ffn_hidden=32,
            moe=placement(16, num_experts=4, top_k=2, expert_hidden=8),
        )
    ).eval()
    docs = [torch.randint(0, 50, (n,)) for n in (5, 3, 4)]
    row = torch.cat([*docs, torch.zeros(2, dtype=torch.long)]).unsqueeze(0)  # 2 padding
    segments = torch.tensor([[1] * 5 + [2] * 3 + [3] * 4 + [0] * 2])
    with torch.no_grad():
        packed = model(row, segment_ids=segments).logits[0]
        start = 0
        for doc in docs:
            alone = model(doc.unsqueeze(0)).logits[0]
            torch.testing.assert_close(
                packed[start : start + len(doc)], alone, rtol=1e-5, atol=1e-5
            )
            start += len(doc)


def test_segment_ids_are_checked():
    model = TransformerLM(
        TransformerConfig(
            vocab_size=20, d_model=8, n_layers=1, attention=AttentionConfig(n_heads=2), ffn_hidden=8
        )
    )
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="segment_ids must be integers of the tokens' shape"):
        model(tokens, segment_ids=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot be combined"):
        model(
            tokens,
            segment_ids=torch.ones(1, 4, dtype=torch.long),
            attention_mask=torch.ones(1, 4, dtype=torch.bool),
        )
