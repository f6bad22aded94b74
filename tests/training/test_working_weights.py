"""bf16 working weights (issue 32, item 3): the step computes with bf16 copies of the matrix
weights kept between steps, the fp32 parameters their masters. The numbers must be autocast's,
to the bit: the forward, every gradient over micro-batches, the optimizer's update, a resumed
run; and only weights autocast would cast to bf16 get a copy."""

import contextlib
import warnings

import pytest
import torch

import moekit
from moekit.models.common.attention import AttentionConfig
from moekit.models.common.mla import MLAConfig
from moekit.models.transformer import MoEPlacementConfig, TransformerConfig, TransformerLM
from moekit.training import load_train_config, train
from moekit.training.working_weights import WorkingWeights, matrix_weights
from tests.builders import TINY_MOE, hybrid_mixers

VARIANTS = {
    "moe_shared_bias": dict(
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, qkv_bias=True),
        shared=moekit.SharedExpertConfig(hidden=16, gated=True),
        bias=True,
    ),
    "mla_tied": dict(
        attention=MLAConfig(
            n_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8
        ),
        tie_embeddings=True,
    ),
    "hybrid": dict(
        attention=AttentionConfig(n_heads=4, n_kv_heads=1),
        n_layers=4,
        token_mixers=hybrid_mixers(),
    ),
}


def _model(name: str) -> TransformerLM:
    torch.manual_seed(0)
    options = {"n_layers": 2, **VARIANTS[name]}
    shared, bias = options.pop("shared", None), options.pop("bias", False)
    layer = moekit.MoEConfig(
        num_experts=4,
        top_k=2,
        experts=moekit.ExpertConfig(hidden=8, bias=bias),
        shared_experts=shared,
    )
    config = TransformerConfig(
        vocab_size=48,
        d_model=16,
        ffn_hidden=32,
        max_seq_len=24,
        moe=MoEPlacementConfig(layer=layer),
        **options,
    )
    return TransformerLM(config)


def _batches():
    torch.manual_seed(1)
    return [torch.randint(0, 48, (2, 9)) for _ in range(2)]


def _micro_batch_step(model, batches, weights=None):
    """Two micro-batches of forward and backward under bf16 autocast, with or without working
    copies; the logits of each."""
    logits = []
    for tokens in batches:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16 warns
            with weights.swapped() if weights else contextlib.nullcontext(), torch.autocast("cpu"):
                out = model(tokens[:, :-1])
                loss = torch.nn.functional.cross_entropy(
                    out.logits.float().flatten(0, 1), tokens[:, 1:].flatten()
                )
                (loss + out.aux_loss).backward()
        if weights:
            weights.move_gradients()
        logits.append(out.logits.detach())
    return logits


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_working_weights_give_autocasts_numbers_to_the_bit(name):
    reference, model = _model(name), _model(name)
    weights = WorkingWeights(model)
    assert len(weights) > 0
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (reference, model)]
    for _ in range(2):  # the second step checks the refreshed copies
        expected = _micro_batch_step(reference, _batches())
        got = _micro_batch_step(model, _batches(), weights)
        for a, b in zip(expected, got, strict=True):
            assert a.dtype == b.dtype
            assert torch.equal(a, b)
        for (n, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
            assert q.dtype == torch.float32, n  # the model's parameters stay the fp32 masters
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                assert q.grad.dtype == torch.float32
                assert torch.equal(p.grad, q.grad), n
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        weights.refresh()
        for p, q in zip(reference.parameters(), model.parameters(), strict=True):
            assert torch.equal(p, q)


def test_only_weights_autocast_casts_to_bf16_get_a_copy():
    model = _model("moe_shared_bias")
    chosen = {
        f"{module_name}.{name}"
        for module_name, module in model.named_modules()
        for m, name in matrix_weights(model)
        if m is module
    }
    names = {n for n, _ in model.named_parameters()}
    assert "blocks.0.attn.q_proj.weight" in chosen and "blocks.0.attn.q_proj.bias" in chosen
    assert "blocks.0.ffn.experts.w_in_EDH" in chosen and "blocks.0.ffn.experts.w_out_EHD" in chosen
    assert "lm_head.weight" in chosen
    for name in names - chosen:  # what stays fp32: norms, embeddings, routers, expert biases
        assert any(part in name for part in ("norm", "embed", "router", "b_in", "b_out", "gate")), (
            name
        )
    assert not any("router" in name or "norm" in name or "embed" in name for name in chosen)
    assert chosen <= names


def test_frozen_weights_get_copies_but_no_gradients():
    model = _model("moe_shared_bias")
    for n, p in model.named_parameters():
        p.requires_grad_("experts" in n)
    weights = WorkingWeights(model)
    _micro_batch_step(model, _batches()[:1], weights)
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("experts" in n), n
    master = model.blocks[0].attn.q_proj.weight
    with torch.no_grad():
        master.add_(1.0)  # a frozen master written outside a step
    weights.refresh()  # the trainable copies only: this one keeps its old value
    with weights.swapped():
        working = model.blocks[0].attn.q_proj.weight
        assert working.dtype == torch.bfloat16 and not working.requires_grad
        assert not torch.equal(working, master.detach().to(torch.bfloat16))
    weights.refresh(trainable_only=False)
    assert torch.equal(working, master.detach().to(torch.bfloat16))


def _train_config(tmp_path, name, text, *extra):
    overrides = [
        *TINY_MOE,
        "bf16=true",
        "steps=6",
        "eval_every=3",
        "optim.grad_accum=2",
        "model.moe.layer.shared_experts.hidden=16",
        *extra,
        f"data.path={text}",
        f"out_dir={tmp_path / name}",
    ]
    return load_train_config(None, overrides)


def test_moekit_train_with_working_weights_equals_autocast_and_resumes(tmp_path, tiny_text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16 warns
        autocast = train(
            _train_config(tmp_path, "fp32", tiny_text, "working_weights=fp32"), progress=False
        )
        working = train(_train_config(tmp_path, "bf16", tiny_text), progress=False)
        config = _train_config(tmp_path, "cut", tiny_text, "checkpoint_every=2")
        train(config, progress=False, stop_after=3)
        resumed = train(config, progress=False, resume=True)
    assert working.records[0]["loss"] == autocast.records[0]["loss"]
    for run in (working, resumed):
        assert [r["loss"] for r in run.records[-3:]] == [r["loss"] for r in autocast.records[-3:]]
        assert [r.get("val_loss") for r in run.records[-3:]] == [
            r.get("val_loss") for r in autocast.records[-3:]
        ]
        for (n, a), b in zip(
            autocast.model.state_dict().items(), run.model.state_dict().values(), strict=True
        ):
            assert a.dtype == b.dtype and torch.equal(a, b), n


def test_working_weights_option_is_checked(tmp_path, tiny_text):
    with pytest.raises(ValueError, match="working_weights must be 'auto', 'bf16' or 'fp32'"):
        _train_config(tmp_path, "bad", tiny_text, "working_weights=fp16")
    config = _train_config(tmp_path, "off", tiny_text, "bf16=false", "working_weights=bf16")
    with pytest.raises(ValueError, match=r"working_weights='bf16' .* bf16 is off"):
        train(config, progress=False)


def test_the_encoder_decoder_with_working_weights_gives_autocasts_numbers():
    from moekit.models.encoder_decoder import EncoderDecoderLM
    from tests.models.test_encoder_decoder import tiny

    torch.manual_seed(0)
    reference = EncoderDecoderLM(tiny())
    model = EncoderDecoderLM(tiny())
    model.load_state_dict(reference.state_dict())
    weights = WorkingWeights(model)
    assert len(weights) > 0
    vocab = reference.config.vocab_size
    tokens, decoder = torch.randint(0, vocab, (2, 7)), torch.randint(0, vocab, (2, 5))
    logits = []
    for m, swap in ((reference, contextlib.nullcontext()), (model, weights.swapped())):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with swap, torch.autocast("cpu"):
                out = m(tokens, decoder_tokens=decoder)
                (out.logits.float().square().mean() + out.aux_loss).backward()
        logits.append(out.logits.detach())
    weights.move_gradients()
    assert torch.equal(logits[0], logits[1])
    for (n, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), n


def test_a_masters_gradient_hook_applies_as_under_autocast():
    """The ``experts:<selection>`` presets mask expert gradients with a hook on the master:
    with working copies the gradient reaches the master outside autograd, and the hook must
    still apply (else the frozen experts would train)."""
    reference, model = _model("moe_shared_bias"), _model("moe_shared_bias")
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(-1, 1, 1)
    for m in (reference, model):
        m.blocks[0].ffn.experts.w_in_EDH.register_hook(lambda g: g * keep)
    weights = WorkingWeights(model)
    _micro_batch_step(reference, _batches())
    _micro_batch_step(model, _batches(), weights)
    got = model.blocks[0].ffn.experts.w_in_EDH.grad
    assert torch.equal(got, reference.blocks[0].ffn.experts.w_in_EDH.grad)
    assert torch.equal(got[1], torch.zeros_like(got[1])) and got[0].abs().sum() > 0


def test_moekit_train_with_an_expert_preset_and_working_weights_keeps_frozen_experts(
    tmp_path, tiny_text
):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = [
            train(
                _train_config(
                    tmp_path, name, tiny_text, f"working_weights={name}",
                    "finetune.preset=experts:0,1",
                ),
                progress=False,
            )
            for name in ("fp32", "bf16")
        ]  # fmt: skip
    a, b = (run.model.state_dict() for run in runs)
    for name in a:
        assert torch.equal(a[name], b[name]), name
