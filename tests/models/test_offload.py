"""Expert offload: a model whose expert bytes exceed the budget several times generates exactly
the tokens of the resident model, within the budget; bad budgets are refused by name."""

import pytest
import torch

from moekit.experts.offload import ExpertCache, parse_bytes
from moekit.experts.quantized import QuantizationConfig
from moekit.models import generate
from moekit.models.checkpoint import save_pretrained
from moekit.models.offload import load_offloaded
from moekit.training.quantize import expert_weight_bytes, quantize_experts
from tests.builders import tiny_lm


def _saved(tmp_path, quantized: bool = False):
    model = tiny_lm(d_model=32, n_layers=3, num_experts=8, expert_hidden=32).eval()
    with torch.no_grad():  # sharper routing than the tiny init gives, so experts matter
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(std=1.0)
    if quantized:
        quantize_experts(model, QuantizationConfig(format="int4", group_size=16))
    save_pretrained(model, tmp_path / "m")
    return model, tmp_path / "m"


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("policy, prefetch", [("lru", True), ("lfu", False), ("lru", False)])
def test_offloaded_generation_equals_resident_generation(tmp_path, quantized, policy, prefetch):
    resident, folder = _saved(tmp_path, quantized)
    total = expert_weight_bytes(resident)
    per_expert = total // (3 * 8)
    budget = int(per_expert * 2.5)  # 2 of the 24 experts at a time: ~10x less than all
    offloaded = load_offloaded(folder, budget=budget, policy=policy, prefetch=prefetch)
    prompt = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            offloaded(prompt).logits, resident(prompt).logits, rtol=0, atol=0
        )
        expected = generate(resident, prompt, 12)
        got = generate(offloaded, prompt, 12)
    offloaded.expert_cache.close()
    assert torch.equal(got, expected)
    stats = offloaded.expert_cache.stats
    assert stats.peak_bytes <= budget and stats.misses > 0 and stats.evictions > 0
    assert 0 <= stats.hit_rate < 1
    assert (stats.prefetched > 0) == prefetch


def test_a_budget_holding_everything_reads_each_expert_once(tmp_path):
    resident, folder = _saved(tmp_path)
    offloaded = load_offloaded(folder, budget=expert_weight_bytes(resident) * 2, prefetch=False)
    prompt = torch.randint(0, 40, (1, 6))
    with torch.no_grad():
        for _ in range(3):
            offloaded(prompt)
    stats = offloaded.expert_cache.stats
    assert stats.evictions == 0 and stats.misses <= 3 * 8 and stats.hits >= 2 * stats.misses


def test_bad_budgets_are_refused_by_name(tmp_path):
    _resident, folder = _saved(tmp_path)
    with pytest.raises(ValueError, match=r"smaller than one expert of blocks.0.ffn.experts"):
        load_offloaded(folder, budget="1KB")
    for text in ("two GB", "-5MB", "3XB", ""):
        with pytest.raises(ValueError, match="is not a size"):
            parse_bytes(text)
    assert parse_bytes("64KB") == 64_000 and parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("1.5kb") == 1500
    with pytest.raises(ValueError, match="must be > 0"):
        ExpertCache(0)


def test_lfu_keeps_the_frequent_expert_that_lru_drops():
    def load(key):
        return lambda: {"w": torch.zeros(1)}

    for policy, kept in (("lru", False), ("lfu", True)):
        cache = ExpertCache(2, policy)
        for key in [("a", 0)] * 3 + [("a", 1), ("a", 2)]:
            cache.get(key, load(key), 1)
        assert (("a", 0) in cache) == kept, policy


def test_generate_cli_with_an_expert_budget_prints_the_same_text(tmp_path, capsys):
    from moekit.cli.main import main
    from moekit.models import AttentionConfig, TransformerConfig, TransformerLM
    from tests.builders import placement

    torch.manual_seed(0)
    model = TransformerLM(
        TransformerConfig(
            vocab_size=256,
            d_model=32,
            n_layers=2,
            attention=AttentionConfig(n_heads=2),
            ffn_hidden=32,
            moe=placement(32, num_experts=8, top_k=2, expert_hidden=32),
        )
    )
    save_pretrained(model, tmp_path / "m")
    args = ["generate", str(tmp_path / "m"), "--prompt", "ab", "--max-new-tokens", "8"]
    assert main([*args, "--temperature", "0"]) == 0
    resident = capsys.readouterr().out
    assert main([*args, "--temperature", "0", "--expert-budget", "40KB"]) == 0
    captured = capsys.readouterr()
    assert captured.out == resident and "hit rate" in captured.err
    assert main([*args, "--expert-budget", "1KB"]) == 2
    assert "smaller than one expert" in capsys.readouterr().err


def test_a_truncated_expert_file_is_named(tmp_path):
    import json
    import struct

    from moekit.experts.offload import ExpertStore

    _, folder = _saved(tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    name = "blocks.2.ffn.experts.w_out_EHD"
    _, end = header[name]["data_offsets"]
    weights.write_bytes(data[: 8 + size + end - 100])  # the last expert's slice is cut short
    with pytest.raises(ValueError, match=r"model.safetensors is corrupt or truncated"):
        load_offloaded(folder, budget="1MB", prefetch=False, verify=False)
    store = ExpertStore(weights)
    store.read("blocks.2.ffn.experts", 0, ["w_out_EHD"])  # whole experts still read
    with pytest.raises(ValueError, match=rf"model.safetensors is truncated: {name} expert 7"):
        store.read("blocks.2.ffn.experts", 7, ["w_out_EHD"])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"junk.safetensors is not a readable safetensors file"):
        ExpertStore(tmp_path / "junk.safetensors")
