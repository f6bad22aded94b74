"""The encoder–decoder MoE model on its own: per-sequence capacity against a cumulative-sum
reference, the relative position buckets against a loop, float64 gradients, training through
the loop, checkpoints and config files."""

import math

import pytest
import torch

from moekit.dispatch.config import CapacityScope, DispatchMode, DropPriority
from moekit.dispatch.dispatcher import DispatchConfig
from moekit.dispatch.sort import plan_dispatch
from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.layers import MoEConfig
from moekit.models.checkpoint import from_pretrained, save_pretrained
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.common.t5_attention import T5Attention
from moekit.models.encoder_decoder import (
    EncoderDecoderConfig,
    EncoderDecoderLM,
    generate_seq2seq,
    relative_position_bucket,
)
from moekit.routing import Gating, TopKRouterConfig


def switch_layer(capacity: int = 0, mode=DispatchMode.CAPACITY) -> MoEConfig:
    return MoEConfig(
        num_experts=4,
        top_k=1,
        experts=ExpertConfig(hidden=24, activation=Activation.RELU),
        router=TopKRouterConfig(gating=Gating.SOFTMAX_TOPK, normalize_weights=False),
        dispatch=DispatchConfig(
            mode=mode,
            expert_capacity=capacity,
            capacity_scope=CapacityScope.SEQUENCE,
            drop_priority=DropPriority.TOKEN,
        ),
    )


def tiny(layer: MoEConfig | None = None, **kw) -> EncoderDecoderConfig:
    layer = layer or switch_layer(capacity=3)
    options = dict(
        vocab_size=256,
        d_model=16,
        n_heads=4,
        head_dim=6,
        ffn_hidden=24,
        n_encoder_layers=3,
        n_decoder_layers=2,
        relative_attention_buckets=8,
        relative_attention_max_distance=16,
        max_seq_len=64,
        encoder_moe=MoEPlacementConfig(layer=layer, every=2),
        decoder_moe=MoEPlacementConfig(layer=layer, layers=[0]),
    )
    options.update(kw)
    return EncoderDecoderConfig(**options)


@pytest.mark.parametrize("K", [1, 2])
def test_per_sequence_capacity_matches_a_running_count(K):
    torch.manual_seed(0)
    B, S, E, C = 4, 13, 5, 2
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(B * S)])
    plan = plan_dispatch(
        idx,
        torch.rand(B * S, K),
        E,
        capacity=C,
        priority=DropPriority.TOKEN,
        sequence_length=S,
        per_sequence=True,
    )
    # reference: walk each sequence's tokens in order, each token's choices in order
    kept = set()
    for b in range(B):
        used = [0] * E
        for s in range(S):
            for j in range(K):
                e = int(idx[b * S + s, j])
                if used[e] < C:
                    used[e] += 1
                    kept.add((b * S + s) * K + j)
    assert set(plan.assignment_idx_M.tolist()) == kept
    experts = idx.view(-1)[plan.assignment_idx_M]
    assert torch.equal(experts, experts.sort(stable=True).values)  # grouped by expert
    assert plan.kept_per_expert_E.tolist() == torch.bincount(experts, minlength=E).tolist()


def test_relative_buckets_match_a_loop():
    def reference(rel, bidirectional, buckets, max_distance):
        out = 0
        if bidirectional:
            buckets //= 2
            out += buckets if rel > 0 else 0
            n = abs(rel)
        else:
            n = max(-rel, 0)
        exact = buckets // 2
        if n < exact:
            return out + n
        large = exact + int(
            math.log(n / exact) / math.log(max_distance / exact) * (buckets - exact)
        )
        return out + min(large, buckets - 1)

    rel = torch.arange(-70, 71)
    for bidirectional in (True, False):
        got = relative_position_bucket(
            rel, bidirectional=bidirectional, num_buckets=32, max_distance=64
        )
        assert got.tolist() == [reference(int(r), bidirectional, 32, 64) for r in rel]


def test_t5_attention_gradcheck_float64():
    torch.manual_seed(0)
    attention = T5Attention(d_model=6, n_heads=2, head_dim=3).double()
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: attention(a, b), (x, bias))


def test_model_gradients_float64_dropless():
    torch.manual_seed(0)
    model = EncoderDecoderLM(tiny(switch_layer(mode=DispatchMode.DROPLESS))).double()
    tokens, decoder = torch.randint(0, 256, (2, 5)), torch.randint(0, 256, (2, 4))
    out = model(tokens, decoder_tokens=decoder)
    out.logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # gradcheck through the whole model: the encoder output as the input (routing is locally
    # constant, so finite differences see the same experts)
    encoded = model.encode(tokens)
    hidden = encoded.hidden.detach().requires_grad_()

    def decode(h):
        encoded.hidden = h
        return model.decode(decoder, encoded).logits

    assert torch.autograd.gradcheck(decode, (hidden,), eps=1e-6, atol=1e-5)


def test_padding_changes_nothing_for_real_tokens():
    torch.manual_seed(0)
    model = EncoderDecoderLM(tiny(switch_layer(capacity=64))).eval()
    tokens, decoder = torch.randint(0, 256, (1, 6)), torch.randint(0, 256, (1, 3))
    padded = torch.cat([tokens, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    with torch.no_grad():
        a = model(tokens, decoder_tokens=decoder).logits
        b = model(padded, decoder_tokens=decoder, attention_mask=mask).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_decoder_capacity_must_be_causal():
    layer = switch_layer(capacity=2)
    layer.dispatch.drop_priority = DropPriority.PROBABILITY
    with pytest.raises(ValueError, match=r"decoder_moe\.layer\.dispatch\.drop_priority"):
        tiny(layer)


def test_checkpoint_round_trip_and_generation(tmp_path):
    torch.manual_seed(0)
    model = EncoderDecoderLM(tiny()).eval()
    save_pretrained(model, tmp_path / "ckpt")
    loaded = from_pretrained(tmp_path / "ckpt").eval()
    assert isinstance(loaded, EncoderDecoderLM) and loaded.config == model.config
    tokens = torch.randint(0, 256, (2, 7))
    assert torch.equal(generate_seq2seq(loaded, tokens, 5), generate_seq2seq(model, tokens, 5))


def test_trains_through_the_loop_from_a_config_file(tmp_path):
    from moekit.training import train
    from moekit.training.config import load_train_config

    config_file = tmp_path / "run.toml"
    config_file.write_text(
        f"""
steps = 30
eval_every = 30
eval_batches = 2
out_dir = "{tmp_path / "run"}"
[data]
seq_len = 24
batch_size = 4
[optim]
lr = 0.01
[model]
vocab_size = 256
d_model = 32
n_heads = 4
ffn_hidden = 64
n_encoder_layers = 2
n_decoder_layers = 2
max_seq_len = 32
[model.encoder_moe]
every = 2
[model.encoder_moe.layer]
num_experts = 4
top_k = 1
experts = {{hidden = 64, activation = "relu"}}
dispatch = {{mode = "capacity", capacity_scope = "sequence", drop_priority = "token"}}
aux_loss = {{switch = 0.01, z_loss = 0.001}}
"""
    )
    config = load_train_config(str(config_file))
    assert isinstance(config.model, EncoderDecoderConfig)
    from moekit.training.finetune import load_streams
    from moekit.training.loop import evaluate

    torch.manual_seed(config.seed)  # the loop's initialisation
    _, validation = load_streams(config)
    before = evaluate(config.model.build(), validation, 2, 4, 24)
    result = train(config, progress=False)
    assert result.evals[-1][1] < before - 0.3
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
    assert any(r.get("moe") for r in result.records)
