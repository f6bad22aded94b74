import pytest
import torch

from moekit.models import TransformerConfig, TransformerLM
from moekit.models.common.attention import AttentionConfig
from moekit.training import load_train_config, train
from moekit.training.data import DataConfig, load_corpus
from moekit.training.loop import evaluate
from moekit.training.upcycle import upcycle


def test_upcycled_model_equals_dense_at_step_zero():
    dense = TransformerLM(
        TransformerConfig(
            vocab_size=50,
            d_model=32,
            n_layers=3,
            attention=AttentionConfig(n_heads=4),
            ffn_hidden=64,
        )
    ).eval()
    moe = upcycle(dense, num_experts=4, top_k=2, every=2).eval()
    assert [type(b.ffn).__name__ for b in moe.blocks] == ["FeedForward", "MoE", "FeedForward"]
    tokens = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(moe(tokens).logits, dense(tokens).logits, rtol=1e-5, atol=1e-5)
    noisy = upcycle(dense, num_experts=4, top_k=2, noise_std=0.01).eval()
    experts = noisy.blocks[0].ffn.experts.w_in_EDH
    assert not torch.equal(experts[0], experts[1])
    fine = upcycle(dense, num_experts=4, top_k=2, granularity=2)
    assert fine.blocks[0].ffn.experts.w_in_EDH.shape == (4, 32, 64)  # 2 x hidden 32, gated
    with pytest.raises(ValueError, match="dense model"):
        upcycle(moe, 4, 2)


def test_upcycled_training_is_not_worse_than_continuing_dense(tmp_path, tiny_text):
    base = [
        "data.seq_len=32",
        "data.batch_size=8",
        "model.d_model=32",
        "model.n_layers=2",
        "model.ffn_hidden=64",
        "model.max_seq_len=64",
        "eval_batches=4",
        "log_every=5",
        "optim.warmup_steps=2",
        f"data.path={tiny_text}",
    ]
    dense_cfg = load_train_config(
        None, [*base, "steps=40", "eval_every=40", f"out_dir={tmp_path / 'dense'}"]
    )
    dense = train(dense_cfg, progress=False).model
    _, val = load_corpus(DataConfig(path=str(tiny_text), seq_len=32))
    losses = {}
    for name, model in (("dense", dense), ("upcycled", upcycle(dense, 4, 2, noise_std=0.01))):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        stream, _ = load_corpus(DataConfig(path=str(tiny_text), seq_len=32))
        for step in range(15):
            x, y = stream.batch(1000 + step, 8, 32, seed=1)
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten())
            optimizer.zero_grad()
            (loss + out.aux_loss).backward()
            optimizer.step()
        losses[name] = evaluate(model, val, 4, 8, 32)
    assert losses["upcycled"] <= losses["dense"] + 0.02
