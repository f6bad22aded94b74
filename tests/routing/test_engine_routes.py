"""Routes from inference engines (vLLM, SGLang) replayed in training: decoding and alignment,
gradients that reach every replayed expert, activation checkpointing, micro-batching, and
refusals of mismatched layer count, k, expert ids and token count."""

import base64

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit.dispatch.reference import reference_moe_output
from moekit.routing.result import RoutingResult
from moekit.routing.topk import Gating
from moekit.utils.randomness import token_randomness
from tests.builders import assert_grads_close, loss_and_grads, make_moe, tiny_lm

# ------------------------------------------------------------------ decoding and alignment


def test_vllm_rows_are_tokens_minus_one_and_the_last_routes_live():
    engine = np.arange(4 * 3 * 2).reshape(4, 3, 2) % 5  # 3 prompt + 2 completion tokens
    routes = moekit.routes_from_vllm(engine, num_tokens=5)
    assert routes.shape == (5, 3, 2) and routes.dtype == torch.int64
    assert torch.equal(routes[:4], torch.as_tensor(engine))
    assert (routes[4] == -1).all()
    with pytest.raises(ValueError, match="num_tokens=7"):
        moekit.routes_from_vllm(engine, num_tokens=7)
    with pytest.raises(ValueError, match=r"\(tokens, layers, k\)"):
        moekit.routes_from_vllm(engine.reshape(4, 6), num_tokens=5)


@pytest.mark.parametrize("dtype", [None, "int32", "uint8"])
def test_sglang_base64_payload_decodes_in_the_senders_dtype(dtype):
    engine = (np.arange(6 * 2 * 3) % 7).reshape(6, 2, 3)  # (prompt + completion - 1, L, K)
    wire = engine.astype(np.int32 if dtype in (None, "int32") else np.uint8)
    meta = {"routed_experts": base64.b64encode(wire.tobytes()).decode()}
    if dtype is not None:
        meta["routed_experts_dtype"] = dtype
    routes = moekit.routes_from_sglang(meta, 7, num_layers=2, top_k=3)
    assert torch.equal(routes[:6], torch.as_tensor(engine, dtype=torch.int64))
    assert (routes[6] == -1).all()
    with pytest.raises(ValueError, match="num_layers × top_k"):
        moekit.routes_from_sglang(meta, 7, num_layers=4, top_k=4)
    with pytest.raises(ValueError, match="enable-return-routed-experts"):
        moekit.routes_from_sglang({}, 7, num_layers=2, top_k=3)


def test_batch_routes_pads_live_and_refuses_overlong():
    a, b = torch.zeros(3, 2, 2, dtype=torch.long), torch.ones(5, 2, 2, dtype=torch.long)
    batch = moekit.batch_routes([a, b], seq_len=5)
    assert batch.expert_idx_BSLK.shape == (2, 5, 2, 2)
    assert (batch.expert_idx_BSLK[0, 3:] == -1).all() and (batch.expert_idx_BSLK[1] == 1).all()
    with pytest.raises(ValueError, match="more than 4"):
        moekit.batch_routes([a, b], seq_len=4)


# ------------------------------------------------------------------ gradients


def _replayed_reference(moe, x_BSD, forced_TK):
    """A looped MoE whose routes are ``forced_TK`` and whose weights are the dense softmax at
    those experts, renormalised as the router was configured: what a replay must compute."""
    cfg = moe.router.config
    assert cfg.gating is Gating.SOFTMAX_TOPK
    logits = F.linear(x_BSD.reshape(-1, moe.d_model), moe.router.weight_ED)
    probs = torch.softmax(logits, dim=-1)
    weights = probs.gather(-1, forced_TK)
    if cfg.normalize_weights:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    routing = RoutingResult(
        expert_idx_TK=forced_TK, weights_TK=weights, logits_TE=logits, probs_TE=probs
    )
    return reference_moe_output(moe, x_BSD, routing)


def _check_replay_gradients(moe, x, routes, forced_TK):
    def replayed(x_):
        with moekit.replay_routing(moe, routes):
            return moe(x_).output

    out, grads = loss_and_grads(moe, x, replayed)
    out_ref, grads_ref = loss_and_grads(moe, x, lambda x_: _replayed_reference(moe, x_, forced_TK))
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, grads_ref)


def test_replayed_weights_come_from_the_live_dense_scores():
    """Output and every gradient (router included) equal a looped MoE with the replayed experts
    weighted by the dense softmax; the same check fails when the weights are detached."""
    torch.manual_seed(0)
    moe = make_moe(d_model=8, num_experts=6, top_k=2)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():  # replay the two *least* likely experts: never what live top-k picks
        logits = F.linear(x.reshape(-1, 8), moe.router.weight_ED)
    forced = logits.argsort(dim=-1)[:, :2].contiguous()
    routes = moekit.TokenRoutes(forced.view(2, 5, 1, 2))
    _check_replay_gradients(moe, x, routes, forced)

    # the field's bug: weights that do not come from the current dense logits
    def detach_weights(_module, _inputs, result):
        return RoutingResult(**{**vars(result), "weights_TK": result.weights_TK.detach()})

    handle = moe.router.register_forward_hook(detach_weights)
    try:
        with pytest.raises(AssertionError, match="not close"):
            _check_replay_gradients(moe, x, routes, forced)
    finally:
        handle.remove()


# ------------------------------------------------------------------ a model in training


def _engine_routes_for(model, tokens):
    """What an engine returns for ``tokens`` (B, S): every layer's experts for the first S - 1
    tokens (dense layers hold 0), ``(S - 1, n_layers, K)`` per sequence."""
    with moekit.record_routing(model) as trace, torch.no_grad():
        model(tokens[:, :-1])
    moe_blocks = [i for i in range(model.config.n_layers) if model.config.moe.is_moe_layer(i)]
    B, S = tokens.shape
    K = trace.expert_idx[0][0].shape[-1]
    per_layer = torch.zeros(B, S - 1, model.config.n_layers, K, dtype=torch.long)
    for r, block in enumerate(moe_blocks):
        per_layer[:, :, block] = trace.expert_idx[r][0].view(B, S - 1, K)
    return [per_layer[b].numpy() for b in range(B)]


def test_engine_routes_replay_on_full_sequences_with_dense_layers_skipped():
    model = tiny_lm(n_layers=3, first_dense=1, vocab_size=40)
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    engine = _engine_routes_for(model, tokens)
    with torch.no_grad():  # the policy moves: its own routes now differ from the rollout's
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    routes = moekit.batch_routes([moekit.routes_from_vllm(e, 9) for e in engine], seq_len=9)
    with moekit.replay_routing(model, routes), moekit.record_routing(model) as replayed:
        model(tokens)
    with moekit.record_routing(model) as live, torch.no_grad():
        model(tokens)
    for r, block in enumerate((1, 2)):
        got = replayed.expert_idx[r][0].view(2, 9, -1)
        want = torch.as_tensor(np.stack(engine))[:, :, block]
        assert torch.equal(got[:, :8], want)  # the engine's experts for every routed token
        assert torch.equal(got[:, 8], live.expert_idx[r][0].view(2, 9, -1)[:, 8])  # last: live
    assert any(
        not torch.equal(
            live.expert_idx[r][0].view(2, 9, -1)[:, :8],
            replayed.expert_idx[r][0].view(2, 9, -1)[:, :8],
        )
        for r in range(2)
    ), "the perturbed policy routes like the rollout: the test would not see a replay"


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_replay_survives_activation_checkpointing_and_micro_batches():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )

    from moekit.models.common.block import Block

    tokens = torch.randint(0, 40, (4, 8), generator=torch.Generator().manual_seed(2))
    reference = tiny_lm(n_layers=2, vocab_size=40)
    forced = torch.randint(0, 4, (4, 8, 2, 1), generator=torch.Generator().manual_seed(3))
    forced = torch.cat([forced, (forced + 1) % 4], dim=-1)  # two distinct experts per token
    routes = moekit.TokenRoutes(forced)

    def loss_of(model, rows):
        logits = model(tokens[rows]).logits
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, 40), tokens[rows, 1:].reshape(-1), reduction="sum"
        )

    with moekit.replay_routing(reference, routes):  # one batch, no checkpointing
        loss_of(reference, slice(0, 4)).backward()
    want = _grads(reference)

    model = tiny_lm(n_layers=2, vocab_size=40)
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    with moekit.replay_routing(model, routes):  # 2 micro-batches of 2 rows, as train_step does
        for micro in range(2):
            with token_randomness(model, seed=0, step=0, row_offset=2 * micro, rows=2):
                loss_of(model, slice(2 * micro, 2 * micro + 2)).backward()
    got = {n.replace("_checkpoint_wrapped_module.", ""): g for n, g in _grads(model).items()}
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_mismatched_routes_are_refused_by_name():
    model = tiny_lm(n_layers=3, first_dense=1, vocab_size=40)
    tokens = torch.randint(0, 40, (2, 6))
    ok = torch.zeros(2, 6, 2, 2, dtype=torch.long)
    ok[..., 1] = 1

    def enter(routes, *inputs):
        with moekit.replay_routing(model, moekit.TokenRoutes(routes)):
            for x in inputs:
                model(x)

    with pytest.raises(ValueError, match="routes have 4 layers; this model has 2 MoE layers"):
        enter(torch.zeros(2, 6, 4, 2).long())
    with pytest.raises(ValueError, match=r"k=3 experts per token.*top_k=2"):
        enter(torch.zeros(2, 6, 2, 3).long())
    bad = ok.clone()
    bad[0, 0, 1, 0] = 9
    with pytest.raises(ValueError, match=r"names expert 9.*4 experts"):
        enter(bad)
    with pytest.raises(ValueError, match="token count mismatch"):
        enter(ok, tokens[:, :5])
    with moekit.replay_routing(model, moekit.TokenRoutes(ok)):  # the right shape runs
        model(tokens)
    assert all(r.forced_routes is None for _, r in moekit.layers.switches.moe_routers(model))
