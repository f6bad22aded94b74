"""REAM merging: saliency centroids, gated similarity, pseudo-pruning groups, a layer-by-layer
merge whose twin experts fold together, and the ``moekit merge --method ream`` command."""

import pytest
import torch

import moekit
from moekit.training.ream import gated_similarity, ream_groups, ream_merge
from tests.builders import tiny_lm

pytest.importorskip("scipy")


def test_groups_take_the_most_similar_unassigned_experts_in_saliency_order():
    saliency = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.3, 0.05])
    sim = torch.eye(6)
    sim[0, 1] = sim[1, 0] = 0.9  # 1 is most like 0
    sim[0, 3] = sim[3, 0] = 0.8
    sim[2, 5] = sim[5, 2] = 0.7
    sim[0, 5] = sim[5, 0] = 0.75
    # centroids 0, 2, 4 (the most salient); groups of at most 2
    assert ream_groups(saliency, sim, keep=3, group_size=2) == [[0, 1], [2, 5], [4, 3]]
    # larger groups: the first centroid takes its three most similar
    assert ream_groups(saliency, sim, keep=3, group_size=4) == [[0, 1, 3, 5], [2], [4]]


def test_gated_similarity_is_one_for_twin_experts():
    model = tiny_lm(num_experts=4, top_k=2).eval()
    moe = next(m for m in model.modules() if isinstance(m, moekit.MoE))
    with torch.no_grad():
        for tensor in (moe.experts.w_in_EDH, moe.experts.w_out_EHD, moe.router.weight_ED):
            tensor[3].copy_(tensor[0])
    sim = gated_similarity(moe, torch.randn(50, 16))
    torch.testing.assert_close(sim, sim.t())
    torch.testing.assert_close(sim.diagonal(), torch.ones(4))
    assert float(sim[0, 3]) == pytest.approx(1.0, abs=1e-6)
    assert float(sim[0, 1]) < 0.99


def test_ream_merges_every_layer_and_keeps_singleton_centroids_exactly():
    model = tiny_lm(num_experts=4, top_k=2, n_layers=2).eval()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, moekit.MoE)]
    batches = [
        torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)
    ]
    merged, groups = ream_merge(model, batches, 0.5, group_size=3)
    assert [m.num_experts for m in merged.modules() if isinstance(m, moekit.MoE)] == [2, 2]
    name, moe = layers[0]  # the first layer merges on the source's activations
    first = groups[name]
    assert sorted(e for g in first for e in g) == [0, 1, 2, 3]
    assert all(len(g) <= 3 for g in first)
    kept = sorted(g[0] for g in first)
    new_moe = dict(merged.named_modules())[name]
    for group in first:
        position = kept.index(group[0])
        torch.testing.assert_close(  # the centroid keeps its router row
            new_moe.router.weight_ED[position], moe.router.weight_ED[group[0]]
        )
        if len(group) == 1:  # a singleton is the expert itself
            torch.testing.assert_close(
                new_moe.experts.w_in_EDH[position], moe.experts.w_in_EDH[group[0]]
            )
    with torch.no_grad():
        assert torch.isfinite(merged(batches[0]).logits).all()
    with pytest.raises(ValueError, match="cannot hold"):
        ream_merge(model, batches, 0.5, group_size=1)


def test_merge_command_takes_method_ream(tmp_path, capsys):
    from moekit.cli.main import main
    from moekit.models import save_pretrained

    model = tiny_lm(num_experts=4, top_k=2, vocab_size=256)
    save_pretrained(model, tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 200)
    args = [
        "merge",
        str(tmp_path / "model"),
        str(tmp_path / "out"),
        "--fraction",
        "0.25",
        "--method",
        "ream",
        "--data",
        str(text),
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert "merged groups" in capsys.readouterr().out
    reloaded = moekit.models.from_pretrained(tmp_path / "out")
    assert [m.num_experts for m in reloaded.modules() if isinstance(m, moekit.MoE)] == [3, 3]
