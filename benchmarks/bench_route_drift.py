"""How far a policy's routes drift from the rollout's routes after N policy-gradient steps when
training does not replay them (the gap Rollout Routing Replay closes; with
``moekit.replay_routing(model, TokenRoutes)`` the trained routes are the rollout's by
construction, tested in tests/routing/test_engine_routes.py).

A tiny MoE LM (byte vocabulary, d_model 64, 4 layers, 8 experts top-2) is pre-trained briefly on
the embedded corpus so that routing means something; it samples rollouts (16-token prompts from
the validation split, 48 sampled tokens); their routes are recorded as an engine would return
them; then the policy takes N steps of a GRPO-style loss (per-sequence advantages ±1, AdamW).
After each step the rollout tokens are routed again and compared with the recorded routes:

- ``set``: share of (token, MoE layer) whose set of k experts changed;
- ``any layer``: share of tokens with a changed set in at least one layer.

    python benchmarks/bench_route_drift.py                  # lr 1e-4 and 1e-3, 3 seeds
    python benchmarks/bench_route_drift.py --steps 20 --seeds 1
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import moekit
from moekit.models import TransformerConfig, TransformerLM
from moekit.models.common.attention import AttentionConfig
from moekit.models.common.placement import MoEPlacementConfig
from moekit.training.data import ByteTokenizer, calibration_batches


def tiny_policy(seed: int) -> TransformerLM:
    torch.manual_seed(seed)
    layer = moekit.MoEConfig(num_experts=8, top_k=2, experts=moekit.ExpertConfig(hidden=64))
    config = TransformerConfig(
        vocab_size=256,
        d_model=64,
        n_layers=4,
        attention=AttentionConfig(n_heads=4),
        ffn_hidden=128,
        moe=MoEPlacementConfig(layer=layer),
    )
    return TransformerLM(config)


def pretrain(model: TransformerLM, steps: int, seed: int) -> None:
    batches = calibration_batches(None, ByteTokenizer(), steps, 8, 65)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for x in batches:
        out = model(x[:, :-1])
        loss = F.cross_entropy(out.logits.reshape(-1, 256), x[:, 1:].reshape(-1)) + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def rollouts(model: TransformerLM, count: int, prompt: int, new: int, seed: int) -> torch.Tensor:
    model.eval()
    tokens = calibration_batches(None, ByteTokenizer(), 1, count, prompt)[0]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(new):
        probs = torch.softmax(model(tokens).logits[:, -1], dim=-1)
        tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return tokens


@torch.no_grad()
def routes_of(model: TransformerLM, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each MoE layer's sorted ``(B·S, k)`` experts for ``tokens`` (eval mode)."""
    model.eval()
    with moekit.record_routing(model) as trace:
        model(tokens)
    return [calls[0].sort(dim=-1).values for calls in trace.expert_idx]


def drift(before: list[torch.Tensor], after: list[torch.Tensor]) -> tuple[float, float]:
    changed = torch.stack([(a != b).any(-1) for a, b in zip(before, after, strict=True)])
    return changed.float().mean().item(), changed.any(0).float().mean().item()


def run(seed: int, lr: float, steps: int, report: list[int]) -> dict[int, tuple[float, float]]:
    model = tiny_policy(seed)
    pretrain(model, 150, seed)
    tokens = rollouts(model, 16, 16, 48, seed)
    recorded = routes_of(model, tokens[:, :-1])  # what the engine returns: S - 1 routed tokens
    advantages = torch.where(torch.arange(16) % 2 == 0, 1.0, -1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    out = {}
    for step in range(1, steps + 1):
        model.train()
        logits = model(tokens[:, :-1]).logits
        logp = -F.cross_entropy(
            logits.reshape(-1, 256), tokens[:, 1:].reshape(-1), reduction="none"
        ).view(16, -1)[:, 15:]  # the completion's tokens
        loss = -(advantages[:, None] * logp).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in report:
            out[step] = drift(recorded, routes_of(model, tokens[:, :-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-3])
    args = parser.parse_args()
    torch.set_num_threads(2)
    report = [s for s in (1, 2, 5, 10, 20, 50, 100) if s <= args.steps]
    print(
        "share of routes that differ from the rollout's, without replay (mean, min-max of "
        f"{args.seeds} seeds)"
    )
    for lr in args.lr:
        runs = [run(seed, lr, args.steps, report) for seed in range(args.seeds)]
        for step in report:
            sets = [r[step][0] for r in runs]
            tokens = [r[step][1] for r in runs]
            mean_sets = 100 * statistics.mean(sets)
            print(
                f"lr {lr:g} step {step:>3}: (token, layer) sets {mean_sets:5.1f} % "
                f"({100 * min(sets):.1f}-{100 * max(sets):.1f}); tokens with any layer changed "
                f"{100 * statistics.mean(tokens):5.1f} % ({100 * min(tokens):.1f}-"
                f"{100 * max(tokens):.1f})"
            )


if __name__ == "__main__":
    main()
