"""SparseMixer (GRIN / Phi-3.5-MoE) against a loop over tokens: inference choices and weights,
training samples among the candidates, and GRIN's gradient estimator."""

import torch

from moekit.routing import SparseMixerRouterConfig
from moekit.routing.sparsemixer import sparsemixer


def reference(scores, k, eps):
    """Per token: k rounds of 'best remaining logit, softmax over the candidates within the
    relative threshold'."""
    weights, chosen = [], []
    for row in scores.tolist():
        taken, w_row = [], []
        for _ in range(k):
            remaining = [s if i not in taken else float("-inf") for i, s in enumerate(row)]
            best = max(remaining)
            cand = [
                i
                for i, s in enumerate(row)
                if i not in taken and (best - s) / max(abs(s), best) <= 2 * eps
            ]
            pick = remaining.index(best)
            z = sum(torch.tensor(row[i]).exp().item() for i in cand)
            w_row.append(torch.tensor(row[pick]).exp().item() / z)
            taken.append(pick)
        weights.append(w_row)
        chosen.append(taken)
    return torch.tensor(weights), torch.tensor(chosen)


def test_inference_matches_a_loop():
    torch.manual_seed(0)
    scores = torch.randn(50, 7, dtype=torch.float64)
    for eps in (0.01, 0.3, 2.0):
        for k in (1, 2, 3):
            w, idx = sparsemixer(scores, k, eps, training=False)
            w_ref, idx_ref = reference(scores, k, eps)
            assert torch.equal(idx, idx_ref)
            assert torch.allclose(w, w_ref.double(), atol=1e-12)


def test_training_samples_candidates_and_uses_grins_gradient():
    torch.manual_seed(0)
    scores = torch.randn(400, 6, dtype=torch.float64, requires_grad=True)
    eps = 0.5
    w, idx = sparsemixer(scores, 1, eps, training=True)
    best = scores.detach().max(-1, keepdim=True).values
    factor = scores.detach().abs().clamp(min=best)
    candidate = ((best - scores.detach()) / factor) <= 2 * eps
    assert candidate.gather(-1, idx).all()  # only candidates are sampled
    assert (idx.squeeze(-1) != scores.argmax(-1)).any()  # and not always the best
    g = torch.randn_like(w)
    (w * g).sum().backward()
    # GRIN: dL/ds = w_o * g * (onehot(chosen) - p), p the candidates' softmax, w_o unscaled
    gates = scores.detach().masked_fill(~candidate, float("-inf"))
    p = torch.softmax(gates, -1)
    w_o = p.gather(-1, idx)
    expected = -p * (w_o * g)
    expected.scatter_add_(-1, idx, w_o * g)
    assert torch.allclose(scores.grad, expected, atol=1e-12)
    # forward: w_o scaled by 1 (the best candidate, or a quarter of the others) or by 1/3
    ratio = (w / w_o).detach()
    assert ((ratio - 1).abs() < 1e-9).logical_or((ratio - 0.3333).abs() < 1e-9).all()


def test_router_module_and_config_round_trip():
    from moekit.routing import RouterConfig

    config = RouterConfig(kind="sparsemixer", jitter_eps=0.1)
    assert isinstance(config, SparseMixerRouterConfig)
    router = config.build(d_model=8, num_experts=5, top_k=2).eval()
    out = router(torch.randn(10, 8))
    assert out.expert_idx_TK.shape == (10, 2)
    assert (out.expert_idx_TK[:, 0] != out.expert_idx_TK[:, 1]).all()
