"""Is there a hot set of experts worth keeping in fast memory? (``moekit inspect``)

Legend: T = tokens, K = experts per token, L = MoE layers, E = experts of a layer.

Three measures over the routing of a data stream, all computed from streaming sums and one
bounded token-order trace:

- **concentration**: sort the (layer, expert) pairs by how many routes they took; how many
  pairs (and what share of all pairs) cover 50 %, 90 % and 99 % of the routes. A strong hot set
  covers 90 % of routes with a small share of pairs; uniform routing needs 90 % of the pairs.
- **next-layer predictability**: how well layer ``l``'s choice tells layer ``l+1``'s. The
  top-1 accuracy of the best lookup table (layer ``l``'s top-1 expert -> the most frequent
  top-1 of layer ``l+1`` with it; fitted and scored on the same data, so an upper bound) beside
  the baseline of always guessing the most used expert; and the recall of the *router
  lookahead* that ``load_offloaded(prefetch=True)`` uses (layer ``l+1``'s router applied to
  layer ``l``'s input: the share of layer ``l+1``'s true experts among its K guesses).
- **cache hit rate for a budget**: the tokens are replayed in order, one at a time (batch-1
  decoding), each touching its K experts in every layer, through an LRU and an LFU cache that
  holds as many experts as the budget's bytes allow.
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from typing import Any

import torch

COVERAGE_LEVELS = (0.5, 0.9, 0.99)


def coverage(counts: list[torch.Tensor]) -> dict[str, dict[str, float]]:
    """For each level in ``COVERAGE_LEVELS``: the fewest (layer, expert) pairs whose routes add
    up to that share of all routes, as a count and as a share of the pairs."""
    flat = torch.cat([c.double().flatten() for c in counts]).sort(descending=True).values
    total = float(flat.sum())
    out = {}
    for level in COVERAGE_LEVELS:
        if total == 0:
            needed = 0
        else:
            cumulative = flat.cumsum(0) / total
            target = torch.tensor(level - 1e-12, dtype=torch.float64)
            needed = int(torch.searchsorted(cumulative, target).item()) + 1
        out[f"{round(level * 100)}%"] = {
            "pairs": needed,
            "share_of_pairs": round(needed / max(len(flat), 1), 6),
        }
    return out


def simulate_cache(
    trace: list[tuple[int, int]], expert_bytes: list[int], budget_bytes: int, policy: str
) -> float:
    """Hit rate of an expert cache of ``budget_bytes`` (``lru`` or ``lfu``) over ``trace``, the
    ordered ``(layer, expert)`` accesses; ``expert_bytes[layer]`` is one expert's size."""
    entries: OrderedDict[tuple[int, int], int] = OrderedDict()
    uses: Counter[tuple[int, int]] = Counter()
    held = hits = 0
    for key in trace:
        uses[key] += 1
        if key in entries:
            hits += 1
            entries.move_to_end(key)
            continue
        size = expert_bytes[key[0]]
        while entries and held + size > budget_bytes:
            victim = next(iter(entries)) if policy == "lru" else min(entries, key=lambda k: uses[k])
            held -= entries.pop(victim)
        if size <= budget_bytes:
            entries[key] = size
            held += size
    return hits / max(len(trace), 1)


class HotSetTracker:
    """Collects what the hot-set report needs while a model streams over data.

    Per batch call ``observe(layer, expert_idx_TK, mask_TK)`` for each MoE layer (and
    ``observe_lookahead(layer, guessed_idx_TK)`` with layer ``layer``'s experts guessed one
    layer early), then ``end_batch()``. At most ``max_tokens`` tokens enter the replay trace.
    """

    def __init__(
        self, num_experts: list[int], expert_bytes: list[int], max_tokens: int = 50_000
    ) -> None:
        self.num_experts, self.expert_bytes = num_experts, expert_bytes
        self.max_tokens = max_tokens
        self.counts = [torch.zeros(E, dtype=torch.long) for E in num_experts]
        self.joint = [
            torch.zeros(a, b, dtype=torch.long) for a, b in itertools.pairwise(num_experts)
        ]
        self.lookahead_hits = [0] * len(num_experts)
        self.lookahead_total = [0] * len(num_experts)
        self.trace: list[tuple[int, int]] = []
        self.traced_tokens = 0
        self._batch: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def observe(
        self, layer: int, expert_idx_TK: torch.Tensor, mask_TK: torch.Tensor | None = None
    ) -> None:
        """One layer's routing of the batch's ``T`` tokens."""
        idx = expert_idx_TK.detach().cpu().long()
        if mask_TK is not None:
            idx = torch.where(mask_TK.cpu(), idx, -1)
        self.counts[layer] += torch.bincount(idx[idx >= 0], minlength=self.num_experts[layer])
        self._batch[layer] = idx

    @torch.no_grad()
    def observe_lookahead(self, layer: int, guessed_idx_TK: torch.Tensor) -> None:
        """Layer ``layer``'s experts as guessed from the previous layer's input."""
        self._batch[-1 - layer] = guessed_idx_TK.detach().cpu().long()

    def end_batch(self) -> None:
        """Fold the batch into the sums and the trace."""
        layers = [layer for layer in range(len(self.num_experts)) if layer in self._batch]
        for layer in layers:
            guess = self._batch.get(-1 - layer)
            actual = self._batch[layer]
            if guess is not None and guess.shape[0] == actual.shape[0]:
                hit = (actual.unsqueeze(2) == guess.unsqueeze(1)).any(2) & (actual >= 0)
                self.lookahead_hits[layer] += int(hit.sum())
                self.lookahead_total[layer] += int((actual >= 0).sum())
            if layer + 1 in self._batch and self._batch[layer + 1].shape[0] == actual.shape[0]:
                a, b = actual[:, 0], self._batch[layer + 1][:, 0]
                keep = (a >= 0) & (b >= 0)
                self.joint[layer].index_put_(
                    (a[keep], b[keep]), torch.ones(int(keep.sum()), dtype=torch.long), True
                )
        if layers and self.traced_tokens < self.max_tokens:
            T = min(self._batch[layers[0]].shape[0], self.max_tokens - self.traced_tokens)
            per_layer = [self._batch[layer][:T].tolist() for layer in layers]
            for t in range(T):
                for layer, rows in zip(layers, per_layer, strict=True):
                    self.trace.extend((layer, e) for e in sorted(set(rows[t])) if e >= 0)
            self.traced_tokens += T
        self._batch = {}

    def report(self, budgets_bytes: list[int] | None = None) -> dict[str, Any]:
        """The three measures (JSON-ready); budgets default to 10 %, 25 % and 50 % of the
        experts' bytes."""
        total = sum(E * b for E, b in zip(self.num_experts, self.expert_bytes, strict=True))
        budgets = budgets_bytes or [int(total * share) for share in (0.1, 0.25, 0.5)]
        prediction = []
        for layer, joint in enumerate(self.joint):
            n = float(joint.sum())
            following = layer + 1
            prediction.append(
                {
                    "from_layer": layer,
                    "to_layer": following,
                    "top1_table_accuracy": round(float(joint.max(1).values.sum()) / n, 6)
                    if n
                    else None,
                    "top1_baseline_accuracy": round(float(joint.sum(0).max()) / n, 6)
                    if n
                    else None,
                    "router_lookahead_recall": round(
                        self.lookahead_hits[following] / self.lookahead_total[following], 6
                    )
                    if self.lookahead_total[following]
                    else None,
                }
            )
        hit_rates = []
        for budget in budgets:
            hit_rates.append(
                {
                    "budget_bytes": budget,
                    "share_of_expert_bytes": round(budget / max(total, 1), 6),
                    "lru_hit_rate": round(
                        simulate_cache(self.trace, self.expert_bytes, budget, "lru"), 6
                    ),
                    "lfu_hit_rate": round(
                        simulate_cache(self.trace, self.expert_bytes, budget, "lfu"), 6
                    ),
                }
            )
        return {
            "routes": int(sum(int(c.sum()) for c in self.counts)),
            "pairs": sum(self.num_experts),
            "coverage": coverage(self.counts),
            "next_layer_prediction": prediction,
            "replayed_tokens": self.traced_tokens,
            "expert_bytes_total": total,
            "cache_hit_rate": hit_rates,
        }
