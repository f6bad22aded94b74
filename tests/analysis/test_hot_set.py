"""Hot-set diagnostics: coverage, next-layer predictability and simulated cache hit rates,
checked on hand-made cases and against the real expert cache of an offloaded model."""

import torch

from moekit.analysis.hot_set import HotSetTracker, coverage, simulate_cache
from moekit.analysis.inspect import expert_bytes_per_layer, inspect_model
from moekit.models.checkpoint import save_pretrained
from moekit.models.offload import load_offloaded
from tests.builders import tiny_lm


def test_coverage_counts_the_fewest_pairs_per_level():
    report = coverage([torch.tensor([90, 5, 4, 1]), torch.tensor([0, 0, 0, 0])])
    assert report["50%"] == {"pairs": 1, "share_of_pairs": 1 / 8}
    assert report["90%"]["pairs"] == 1 and report["99%"]["pairs"] == 3


def test_simulated_lru_and_lfu_follow_their_rules():
    a, b, c = (0, 0), (0, 1), (0, 2)
    trace = [a, a, a, b, c, a, b]
    # room for two experts of 10 bytes: LRU drops a at c (a, b recent? no: b then a) ...
    # LRU: a(m) a(h) a(h) b(m) c(m, evicts a) a(m, evicts b) b(m, evicts c) -> 2 hits
    assert simulate_cache(trace, [10], 20, "lru") == 2 / 7
    # LFU: c evicts b (a used 3 times), a hits, b evicts c -> 3 hits
    assert simulate_cache(trace, [10], 20, "lfu") == 3 / 7
    assert simulate_cache(trace, [10], 30, "lru") == 4 / 7  # everything fits: only 3 misses


def test_a_copied_routing_is_fully_predictable():
    tracker = HotSetTracker([4, 4], [10, 10])
    idx = torch.tensor([[0, 1], [2, 3], [0, 1], [1, 0]])
    tracker.observe(0, idx)
    tracker.observe(1, idx.flip(1))
    tracker.observe_lookahead(1, idx)  # the guess of layer 1: the same pair of experts
    tracker.end_batch()
    (prediction,) = tracker.report()["next_layer_prediction"]
    assert prediction["top1_table_accuracy"] == 1.0
    assert prediction["top1_baseline_accuracy"] == 0.5  # expert 1 is layer 1's top-1 twice
    assert prediction["router_lookahead_recall"] == 1.0


def test_inspect_hit_rates_match_the_offloaded_models_cache(tmp_path):
    model = tiny_lm(d_model=32, n_layers=3, num_experts=8, expert_hidden=32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(std=1.0)
    save_pretrained(model, tmp_path / "m")
    per_expert = expert_bytes_per_layer(model)
    budget = 5 * per_expert[0]
    tokens = torch.randint(0, 40, (1, 24), generator=torch.Generator().manual_seed(3))
    # one token per call, as batch-1 decoding touches the experts: the order the replay assumes
    calls = [tokens[:, t : t + 1] for t in range(tokens.shape[1])]
    offloaded = load_offloaded(tmp_path / "m", budget=budget, prefetch=False)
    with torch.no_grad():
        for call in calls:
            offloaded(call)
    real = offloaded.expert_cache.stats.hit_rate
    report = inspect_model(model, calls, vocab_size=40, budgets_bytes=[budget])
    hot = report["hot_set"]
    assert hot["replayed_tokens"] == 24
    assert abs(hot["cache_hit_rate"][0]["lru_hit_rate"] - real) < 1e-6  # reported to 6 digits
    assert hot["coverage"]["99%"]["pairs"] <= hot["pairs"] == 24
    assert all(p["router_lookahead_recall"] is not None for p in hot["next_layer_prediction"])
