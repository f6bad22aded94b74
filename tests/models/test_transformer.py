import pytest
import torch

import moekit
from moekit.models import (
    MoEPlacementConfig,
    TransformerConfig,
    TransformerLM,
    from_pretrained,
    generate,
    save_pretrained,
)
from moekit.models.common.attention import AttentionConfig
from moekit.models.transformer.generate import filter_logits
from tests.builders import placement

ROUTER_SETUPS = {
    "dense": MoEPlacementConfig(),
    "softmax_topk": placement(32, num_experts=4, top_k=2, expert_hidden=16),
    "topk_softmax_every2": placement(
        32,
        num_experts=4,
        top_k=2,
        expert_hidden=16,
        every=2,
        router=moekit.RouterConfig(gating="topk_softmax"),
    ),
    "sigmoid_groups_bias_shared": placement(
        32,
        num_experts=8,
        top_k=2,
        expert_hidden=16,
        first_dense=1,
        router=moekit.RouterConfig(
            gating="sigmoid_topk",
            num_groups=4,
            topk_groups=2,
            bias_balancing=True,
            routed_scaling_factor=2.0,
        ),
        shared_experts=moekit.SharedExpertConfig(hidden=16, gated=True),
    ),
    "switch_top1_capacity_token": placement(
        32,
        num_experts=4,
        top_k=1,
        expert_hidden=16,
        dispatch=moekit.DispatchConfig(
            mode="capacity", capacity_factor=1.0, min_capacity=1, drop_priority="token"
        ),
    ),
    "noisy_top2": placement(
        32,
        num_experts=4,
        top_k=2,
        expert_hidden=16,
        router=moekit.RouterConfig(noisy_gating=True, gating="topk_softmax"),
        aux_loss=moekit.AuxLossConfig(switch=0.01, load=0.01, importance=0.01, z_loss=0.001),
    ),
}


def tiny_config(
    moe: MoEPlacementConfig, *, attention: dict | None = None, **model
) -> TransformerConfig:
    """A 3-block model on ``moe``; ``attention`` and ``model`` override fields."""
    fields = dict(vocab_size=37, d_model=32, n_layers=3, ffn_hidden=32, max_seq_len=64)
    return TransformerConfig(
        **{**fields, **model},
        attention=AttentionConfig(**{"n_heads": 4, "n_kv_heads": 2, **(attention or {})}),
        moe=moe,
    )


@pytest.mark.parametrize("setup", sorted(ROUTER_SETUPS))
def test_changing_a_future_token_never_changes_an_earlier_logit(setup):
    model = TransformerLM(tiny_config(ROUTER_SETUPS[setup])).eval()
    tokens = torch.randint(0, 37, (3, 12))
    with torch.no_grad():
        base = model(tokens).logits
        for pos in (4, 9):
            changed = tokens.clone()
            changed[:, pos:] = (changed[:, pos:] + 5) % 37
            out = model(changed).logits
            torch.testing.assert_close(out[:, :pos], base[:, :pos], rtol=0, atol=1e-5)
            assert not torch.allclose(out[:, pos], base[:, pos])


def test_causality_in_training_mode_with_capacity():
    model = TransformerLM(tiny_config(ROUTER_SETUPS["switch_top1_capacity_token"])).train()
    tokens = torch.randint(0, 37, (2, 16))
    base = model(tokens)
    assert any(float(o.stats.dropped_fraction) > 0 for o in base.moe_outputs)  # drops happen
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 37
    torch.testing.assert_close(model(changed).logits[:, :8], base.logits[:, :8], rtol=0, atol=1e-5)


def test_non_causal_capacity_priority_is_refused():
    with pytest.raises(ValueError, match="not causal"):
        tiny_config(
            placement(
                32,
                num_experts=4,
                expert_hidden=8,
                dispatch=moekit.DispatchConfig(mode="capacity", drop_priority="probability"),
            )
        )


def test_shapes_aux_loss_and_layer_placement():
    cfg = tiny_config(ROUTER_SETUPS["topk_softmax_every2"], n_layers=4)
    model = cfg.build()
    assert isinstance(model, TransformerLM) and model.config is cfg
    out = model(torch.randint(0, 37, (2, 5)))
    assert out.logits.shape == (2, 5, 37)
    assert [type(b.ffn).__name__ for b in model.blocks] == ["FeedForward", "MoE"] * 2
    torch.testing.assert_close(out.aux_loss, sum(o.aux_loss for o in out.moe_outputs))
    dense = TransformerLM(tiny_config(MoEPlacementConfig()))
    assert float(dense(torch.randint(0, 37, (1, 4))).aux_loss) == 0.0


def test_bad_inputs():
    model = TransformerLM(tiny_config(ROUTER_SETUPS["softmax_topk"]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.randn(2, 3))
    with pytest.raises(ValueError, match="vocab_size=37"):
        model(torch.tensor([[1, 40]]))
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="n_kv_heads"):
        tiny_config(MoEPlacementConfig(), attention={"n_kv_heads": 3})


@pytest.mark.parametrize("setup", ["dense", "sigmoid_groups_bias_shared", "topk_softmax_every2"])
@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=10, top_p=0.9)])
def test_cached_generation_equals_recomputing_the_prefix(setup, sampling):
    model = TransformerLM(tiny_config(ROUTER_SETUPS[setup])).eval()
    prompt = torch.randint(0, 37, (2, 5))
    outs = [
        generate(
            model,
            prompt,
            12,
            use_cache=use_cache,
            generator=torch.Generator().manual_seed(3),
            **sampling,
        )
        for use_cache in (True, False)
    ]
    assert outs[0].shape == (2, 17)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][:, :5], prompt)


def test_generation_stops_at_stop_token_and_max_len():
    model = TransformerLM(tiny_config(ROUTER_SETUPS["softmax_topk"])).eval()
    prompt = torch.randint(0, 37, (6,))
    greedy = generate(model, prompt, 10)
    stop = int(greedy[6])  # the first generated token
    stopped = generate(model, prompt, 10, stop_token=stop)
    assert stopped.tolist() == greedy[:7].tolist()
    assert generate(model, torch.zeros(60, dtype=torch.long), 10).shape == (64,)  # max_seq_len


def test_greedy_generation_equals_a_plain_argmax_loop():
    """generate runs under moekit.serving (no losses or statistics): the tokens are those of a
    plain loop over the full model."""
    model = TransformerLM(tiny_config(ROUTER_SETUPS["softmax_topk"])).eval()
    tokens = torch.randint(0, 37, (2, 5))
    generated = generate(model, tokens, 8)
    with torch.no_grad():
        for _ in range(8):
            next_token = model(tokens).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(generated, tokens)
    assert all(m.losses_enabled for m in model.modules() if isinstance(m, moekit.MoE))


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, top_p=0.75))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.75
    kept = ~torch.isinf(filter_logits(logits, top_p=0.5))
    assert kept.tolist() == [[True, False, False, False]]
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    cfg = tiny_config(ROUTER_SETUPS["sigmoid_groups_bias_shared"], tie_embeddings=True)
    model = TransformerLM(cfg)
    model.blocks[2].ffn.router.expert_bias_E.copy_(torch.randn(8))  # buffers travel too
    save_pretrained(model, tmp_path / "ckpt")
    loaded = from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    for (k1, v1), (k2, v2) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)
    tokens = torch.randint(0, 37, (2, 9))
    assert torch.equal(model.eval()(tokens).logits, loaded.eval()(tokens).logits)


def test_checkpoint_errors_name_the_problem(tmp_path):
    model = TransformerLM(tiny_config(ROUTER_SETUPS["softmax_topk"]))
    ckpt = save_pretrained(model, tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        from_pretrained(tmp_path / "nowhere")
    # a config that does not match the weights
    other = tmp_path / "other"
    save_pretrained(TransformerLM(tiny_config(placement(16), d_model=16)), other)
    (other / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="damaged"):  # not the file its checksum names
        from_pretrained(other)
    with pytest.raises(ValueError, match="shape mismatch"):
        from_pretrained(other, verify=False)
    # a corrupt weights file
    (other / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        from_pretrained(other, verify=False)
    (other / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        from_pretrained(other)
    # an unknown config key
    text = (ckpt / "config.json").read_text().replace('"d_model"', '"d_modle"')
    (ckpt / "config.json").write_text(text)
    with pytest.raises(ValueError, match="unknown TransformerConfig keys: d_modle"):
        from_pretrained(ckpt)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import moekit.models.checkpoint as checkpoint

    model = TransformerLM(tiny_config(ROUTER_SETUPS["softmax_topk"]))
    save_pretrained(model, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(checkpoint, "atomic_write_json", crash)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, tmp_path / "ckpt")
    after = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging debris
    from_pretrained(tmp_path / "ckpt")


def test_tiny_moe_lm_overfits_a_small_batch():
    torch.manual_seed(0)
    model = TransformerLM(tiny_config(ROUTER_SETUPS["softmax_topk"], n_layers=2))
    tokens = torch.randint(0, 37, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        out = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, 37), tokens[:, 1:].reshape(-1)
        )
        optimizer.zero_grad()
        (loss + out.aux_loss).backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 3.0
    assert losses[-1] < 0.2
