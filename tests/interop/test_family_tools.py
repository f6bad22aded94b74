"""Every tool on a model imported from each family of issue 23 (tiny random checkpoints): inspect,
record/replay, runtime k, prune, merge, fine-tuning presets, LoRA with PEFT export (reloaded by
PEFT), upcycling a dense model of the family's shape, and the parameter accounting."""

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import moekit  # noqa: E402
from moekit.adapters.lora import LoRAConfig, add_lora  # noqa: E402
from moekit.analysis.inspect import inspect_model  # noqa: E402
from moekit.analysis.params import count_parameters  # noqa: E402
from moekit.interop import from_hf, to_hf  # noqa: E402
from moekit.interop.peft_adapters import (  # noqa: E402
    ATTENTION_ONLY,
    MLA_FAMILIES,
    export_peft_adapter,
)
from moekit.layers.switches import moe_layers  # noqa: E402
from moekit.models import TransformerLM  # noqa: E402
from moekit.training.compress import merge, prune  # noqa: E402
from moekit.training.presets import apply_selection, select_parameters  # noqa: E402
from moekit.training.upcycle import upcycle  # noqa: E402
from tests.interop.tiny_families import FAMILIES  # noqa: E402

TOKENS = [
    torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)
]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    hf = FAMILIES[request.param]()
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    hf.save_pretrained(folder)
    return request.param, hf, folder


def test_accounting_counts_the_imported_model(family):
    _, hf, _ = family
    model = from_hf(hf)
    assert count_parameters(model).total == sum(p.numel() for p in model.parameters())


def test_inspect_replay_and_runtime_k(family):
    _, hf, _ = family
    model = from_hf(hf).eval()
    report = inspect_model(model, TOKENS, vocab_size=64)
    assert report["layers"] and all(layer["tokens"] > 0 for layer in report["layers"])
    with torch.no_grad():
        with moekit.record_routing(model) as trace:
            recorded = model(TOKENS[0]).logits
        with moekit.replay_routing(model, trace):
            assert torch.equal(model(TOKENS[0]).logits, recorded)
    k = max(layer.top_k for layer in moe_layers(model))
    if model.config.moe.layer.router.kind.value == "top_k":
        assert moekit.set_top_k(model, k + 1) > 0
        with torch.no_grad():
            assert not torch.equal(model(TOKENS[0]).logits, recorded)


def test_prune_and_merge(family, tmp_path):
    name, hf, _ = family
    model = from_hf(hf).eval()
    pruned, kept = prune(model, TOKENS, 0.5)
    merged, groups = merge(model, TOKENS, 0.5)
    for smaller in (pruned, merged):
        counts = smaller.config.moe.experts_per_layer
        assert counts is not None and max(counts) < model.config.moe.num_experts
        assert not smaller.training  # the source's mode
        with torch.no_grad():
            assert torch.isfinite(smaller(TOKENS[0]).logits).all()
    assert kept and groups
    router = model.config.moe.layer.router
    if getattr(router, "num_groups", 1) > 1:  # group-limited: the same count from every group
        size = model.config.moe.num_experts // router.num_groups
        for experts in kept.values():
            per_group = [sum(e // size == g for e in experts) for g in range(router.num_groups)]
            assert len(set(per_group)) == 1, per_group
    # every layer pruned alike: the family holds it, and transformers computes the same
    if name == "jetmoe":  # its attention mixture keeps every expert: the counts differ
        with pytest.raises(ValueError, match="share num_local_experts"):
            to_hf(pruned, tmp_path / "pruned", name)
        return
    to_hf(pruned, tmp_path / "pruned", name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        assert (reloaded(TOKENS[0]).logits - pruned(TOKENS[0]).logits).abs().max() <= 1e-5


def test_presets_train_only_their_groups(family):
    _, hf, _ = family
    model = from_hf(hf)
    apply_selection(model, select_parameters(model, "attention+router"))
    model(TOKENS[0]).logits.sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".attn." in n or ".router." in n for n in trained)


def test_lora_trains_and_exports_to_peft(family, tmp_path):
    name, _, folder = family
    if name == "jetmoe":  # its attention experts are not nn.Linear modules PEFT could target
        pytest.skip("PEFT export of a mixture of attention heads is not written")
    model = from_hf(folder)
    targets = ["attention", "experts"]
    if name in ATTENTION_ONLY:
        targets = ["attention"]
    elif name in MLA_FAMILIES:
        targets = ["experts"]
    add_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=targets))
    with torch.no_grad():  # adapters away from zero, as after training
        for n, p in model.named_parameters():
            if "lora" in n or ".adapter." in n:
                p.normal_(0, 0.05)
    model.eval()
    export_peft_adapter(model, folder, tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = model(TOKENS[0]).logits, adapted(TOKENS[0]).logits
        plain = from_hf(folder).eval()(TOKENS[0]).logits
    assert (ours - plain).abs().max() > 1e-4  # the adapters do something
    assert (ours - theirs).abs().max() <= 1e-4


def test_upcycle_a_dense_model_of_the_family_shape(family):
    """The family's attention, norms and multipliers with a dense FFN, upcycled: the MoE starts
    as the dense function."""
    _, hf, _ = family
    imported = from_hf(hf)
    config = imported.config
    layer = config.moe.layer
    dense = TransformerLM(
        dataclasses.replace(
            config,
            ffn_hidden=layer.experts.hidden,
            moe=dataclasses.replace(config.moe, layer=None, experts_per_layer=None),
        )
    ).eval()
    moe = upcycle(dense, num_experts=4, top_k=2).eval()
    with torch.no_grad():  # copies of the dense FFN, weights summing to 1: the dense function
        assert (moe(TOKENS[0]).logits - dense(TOKENS[0]).logits).abs().max() <= 1e-4
