"""Pruning and merging experts: exact where they must be, per-layer counts everywhere."""

import pytest
import torch

import moekit
from moekit.analysis.params import count_parameters
from moekit.cli.main import main
from moekit.models.checkpoint import from_pretrained, save_pretrained
from moekit.training import load_train_config, train
from moekit.training.compress import (
    choose_kept,
    merge_experts,
    prune,
    prune_experts,
    saliency_scores,
)
from tests.builders import TINY_MOE, placement, tiny_lm

TOKENS = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))


def _lm(top_k=2, **router):
    router = moekit.RouterConfig(gating="softmax_topk", normalize_weights=True, **router)
    return tiny_lm(top_k=top_k, router=router).eval()


def test_pruning_an_expert_nobody_picks_leaves_the_outputs_unchanged():
    model = _lm(bias=True)
    with torch.no_grad():
        for block in model.blocks:
            block.ffn.router.bias_E[3] = -1e4
    expected = model(TOKENS).logits
    names = ["blocks.0.ffn", "blocks.1.ffn"]
    assert saliency_scores(model, [TOKENS])["blocks.0.ffn"][3] == 0
    pruned = prune_experts(model, {n: [0, 1, 2] for n in names})
    assert pruned.config.moe.experts_per_layer == [3, 3]
    assert pruned.blocks[0].ffn.router.weight_ED.shape == (3, 16)
    torch.testing.assert_close(pruned(TOKENS).logits, expected, rtol=1e-5, atol=1e-5)


def test_merging_two_identical_experts_leaves_the_outputs_unchanged():
    model = _lm(top_k=1)
    with torch.no_grad():
        for block in model.blocks:
            bank, router = block.ffn.experts, block.ffn.router
            order = torch.randperm(8)  # the twin's hidden units in another order
            H = 8
            w_in = bank.w_in_EDH[0]
            bank.w_in_EDH[1] = torch.cat([w_in[:, :H][:, order], w_in[:, H:][:, order]], dim=1)
            bank.w_out_EHD[1] = bank.w_out_EHD[0][order]
            router.weight_ED[1] = router.weight_ED[0]
    expected = model(TOKENS).logits
    groups = {n: [[0, 1], [2], [3]] for n in ("blocks.0.ffn", "blocks.1.ffn")}
    frequencies = {n: torch.tensor([5.0, 3.0, 1.0, 1.0]) for n in groups}
    merged = merge_experts(model, groups, frequencies)
    assert merged.config.moe.experts_per_layer == [3, 3]
    torch.testing.assert_close(merged(TOKENS).logits, expected, rtol=1e-5, atol=1e-5)


def test_per_layer_counts_survive_save_load_and_accounting(tmp_path):
    model = _lm()
    pruned = prune_experts(model, {"blocks.0.ffn": [0, 2, 3], "blocks.1.ffn": [1, 3]})
    save_pretrained(pruned, tmp_path / "m")
    again = from_pretrained(tmp_path / "m")
    assert again.config.moe.experts_per_layer == [3, 2]
    torch.testing.assert_close(again.eval()(TOKENS).logits, pruned(TOKENS).logits)
    assert count_parameters(again).total == sum(p.numel() for p in again.parameters())
    pytest.importorskip("transformers")
    from moekit.interop.hf import to_hf

    with pytest.raises(ValueError, match="experts_per_layer"):
        to_hf(pruned, tmp_path / "hf", "mixtral")


def test_global_scope_keeps_top_k_per_layer_and_bad_input_is_refused():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 20.0, 30.0, 40.0])}
    # a quarter of all 8 experts: the two lowest scores overall are both in layer a
    assert choose_kept(scores, 0.25, top_k=2, scope="global") == {"a": [2, 3], "b": [0, 1, 2, 3]}
    assert choose_kept(scores, 0.25, top_k=2, scope="layer") == {"a": [1, 2, 3], "b": [1, 2, 3]}
    # half of them: layer a may not go below top_k, so the rest come from b
    assert choose_kept(scores, 0.5, top_k=2, scope="global") == {"a": [2, 3], "b": [2, 3]}
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        choose_kept(scores, 1.0, top_k=2)
    model = _lm()
    with pytest.raises(ValueError, match="cannot remove every expert"):
        prune_experts(model, {"blocks.0.ffn": [], "blocks.1.ffn": [0, 1]})
    with pytest.raises(ValueError, match=">= top_k=2"):
        prune_experts(model, {"blocks.0.ffn": [0], "blocks.1.ffn": [0, 1]})
    with pytest.raises(ValueError, match=r"moe\.experts_per_layer entries must be >= top_k"):
        moekit.models.MoEPlacementConfig(layer=placement(16).layer, experts_per_layer=[1, 4])


def test_prune_and_merge_from_the_command_line(tmp_path, tiny_text, capsys):
    run = tmp_path / "run"
    train(
        load_train_config(None, [*TINY_MOE, "steps=2", f"out_dir={run}", f"data.path={tiny_text}"]),
        progress=False,
    )
    common = ["--data", str(tiny_text), "--batches", "1", "--seq-len", "32", "--fraction", "0.5"]
    assert main(["prune", str(run), str(tmp_path / "p"), *common, "--method", "saliency"]) == 0
    assert from_pretrained(tmp_path / "p").config.moe.experts_per_layer == [2, 2]
    assert main(["merge", str(run), str(tmp_path / "m"), *common]) == 0
    assert "merged groups" in capsys.readouterr().out
    _, kept = prune(from_pretrained(tmp_path / "m"), [torch.randint(0, 256, (1, 8))], 0.0)
    assert all(len(v) == 2 for v in kept.values())
