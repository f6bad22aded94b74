"""Expert LoRA layouts: PEFT 0.19.1+ ("peft"), PEFT 0.18.0–0.19.0 ("peft-0.18") and per-expert
(vLLM-servable); conversions between them, and merges into the base weights that equal the
base with the adapter applied by the real ``peft`` (the expert delta included)."""

import pytest
import torch

from moekit.adapters import LoRAConfig, add_lora, lora_parameters
from moekit.interop.adapter_layouts import (
    ExpertAdapterLayout,
    convert_adapter,
    detect_layout,
    expert_updates,
    layout_of_version,
    merge_adapter,
    read_adapter,
    write_adapter,
)
from moekit.interop.hf import from_hf
from moekit.interop.peft_adapters import export_peft_adapter
from tests.interop.tiny_hf import mixtral, qwen_or_olmoe, transformers

peft = pytest.importorskip("peft")

PEFT, OLD, PER_EXPERT = (
    ExpertAdapterLayout.PEFT,
    ExpertAdapterLayout.PEFT_0_18,
    ExpertAdapterLayout.PER_EXPERT,
)
TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))


def _peft_adapter(tmp_path, family="qwen3_moe"):
    """A random PEFT adapter (attention modules and both expert parameters) saved by the
    installed PEFT, with the base folder and PEFT's own logits."""
    base_folder = tmp_path / "hf"
    (mixtral() if family == "mixtral" else qwen_or_olmoe(family)).save_pretrained(base_folder)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=6,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        rank_pattern={"q_proj": 4},
        init_lora_weights=False,
    )
    model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
        logits = model(TOKENS).logits
    model.save_pretrained(tmp_path / "adapter")
    return base_folder, tmp_path / "adapter", logits


def _base(base_folder):
    return transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)


def _logits_of_merged(base_folder, merged):
    model = _base(base_folder).eval()
    model.load_state_dict(merged)
    with torch.no_grad():
        return model(TOKENS).logits


def test_versions_map_to_layouts():
    assert layout_of_version("0.18.0") is OLD and layout_of_version("0.19.0") is OLD
    assert layout_of_version("0.19.1") is PEFT and layout_of_version("0.21.2") is PEFT


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_merged_model_equals_base_with_the_adapter_applied_by_peft(tmp_path, family):
    base_folder, folder, peft_logits = _peft_adapter(tmp_path, family)
    adapter = read_adapter(folder)
    assert detect_layout(adapter) is PEFT  # PEFT 0.21 records its version
    state = _base(base_folder).state_dict()
    merged = merge_adapter(state, adapter)
    torch.testing.assert_close(
        _logits_of_merged(base_folder, merged), peft_logits, rtol=1e-5, atol=1e-5
    )
    # the expert delta is in the merge (the unsloth-zoo #647 failure drops it)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert (merged[key] - state[key]).abs().max() > 1e-3
    without_experts = dict(merged)
    for name in ("gate_up_proj", "down_proj"):
        for layer in range(2):
            k = f"model.layers.{layer}.mlp.experts.{name}"
            without_experts[k] = state[k]
    assert (_logits_of_merged(base_folder, without_experts) - peft_logits).abs().max() > 1e-3


def test_peft_0_18_layout_round_trips_and_merges_to_the_same_model(tmp_path):
    base_folder, folder, peft_logits = _peft_adapter(tmp_path)
    adapter = read_adapter(folder)
    old = convert_adapter(adapter, OLD, family="qwen3_moe")
    assert old.config["peft_version"] == "0.18.0" and detect_layout(old) is OLD
    key = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"  # gate_up
    assert adapter.tensors[key].shape == (8, 32)  # (E·r, D): reads the hidden size
    assert old.tensors[key].shape == (8, 48)  # PEFT 0.18: (E·r, 2I), the parameter's dim 1
    # PEFT 0.18's own formula for the update, written out: einsum("ore,eri->eio") · alpha/r
    A, B = old.tensors[key], old.tensors[key.replace("lora_A", "lora_B")]
    by_018 = torch.einsum("ore,eri->eio", B.reshape(32, 2, 4), A.reshape(4, 2, 48)) * 3.0
    ours = expert_updates(adapter, PEFT)[
        ("base_model.model.model.layers.0.mlp.experts", "gate_up_proj")
    ]
    torch.testing.assert_close(by_018, ours, rtol=1e-5, atol=1e-6)
    state = _base(base_folder).state_dict()
    torch.testing.assert_close(
        _logits_of_merged(base_folder, merge_adapter(state, old)),
        peft_logits,
        rtol=1e-5,
        atol=1e-5,
    )
    back = convert_adapter(old, PEFT, family="qwen3_moe")
    assert back.tensors.keys() == adapter.tensors.keys()
    for name, value in adapter.tensors.items():
        torch.testing.assert_close(back.tensors[name], value, rtol=0, atol=1e-7)
    # one layout read as the other: refused by shape, not silently transposed
    with pytest.raises(ValueError, match="another layout"):
        merge_adapter(state, old, layout=PEFT)
    # written and read back; without a recorded version the shapes tell
    write_adapter(old, tmp_path / "old")
    reread = read_adapter(tmp_path / "old")
    del reread.config["peft_version"]
    assert detect_layout(reread, hidden_size=32) is OLD
    with pytest.raises(ValueError, match="hidden_size"):
        detect_layout(reread)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_per_expert_layout_splits_exactly_and_merges_to_the_same_model(tmp_path, family):
    base_folder, folder, peft_logits = _peft_adapter(tmp_path, family)
    adapter = read_adapter(folder)
    per_expert = convert_adapter(adapter, PER_EXPERT, family=family)
    gate, up, down = (
        ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    )
    stem = "base_model.model.model.layers.1.mlp.experts.3"
    inter = 48 if family == "mixtral" else 24
    assert per_expert.tensors[f"{stem}.{gate}.lora_A.weight"].shape == (2, 32)  # (r, D)
    assert per_expert.tensors[f"{stem}.{up}.lora_B.weight"].shape == (inter, 2)  # (I, r)
    assert per_expert.tensors[f"{stem}.{down}.lora_A.weight"].shape == (2, inter)
    assert per_expert.config["target_parameters"] is None
    assert {gate, up, down} <= set(per_expert.config["target_modules"])
    assert detect_layout(per_expert) is PER_EXPERT
    state = _base(base_folder).state_dict()
    torch.testing.assert_close(
        _logits_of_merged(base_folder, merge_adapter(state, per_expert)),
        peft_logits,
        rtol=1e-5,
        atol=1e-5,
    )
    # from the PEFT 0.18 layout the per-expert factors are the same
    from_old = convert_adapter(
        convert_adapter(adapter, OLD, family=family), PER_EXPERT, family=family
    )
    for name, value in per_expert.tensors.items():
        torch.testing.assert_close(from_old.tensors[name], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ["peft", "peft-0.18", "per-expert"])
def test_moekit_exports_each_layout_and_the_merge_is_moekits_model(tmp_path, layout):
    source = tmp_path / "hf"
    qwen_or_olmoe("qwen3_moe").save_pretrained(source)
    model = from_hf(source).eval()
    add_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=["attention", "experts"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(0, 0.2)
        ours = model(TOKENS).logits
    export_peft_adapter(model, source, tmp_path / "adapter", layout=layout)
    adapter = read_adapter(tmp_path / "adapter")
    assert detect_layout(adapter, hidden_size=32) is ExpertAdapterLayout(layout)
    merged = merge_adapter(_base(source).state_dict(), adapter)
    torch.testing.assert_close(_logits_of_merged(source, merged), ours, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="layout must be one of"):
        export_peft_adapter(model, source, tmp_path / "x", layout="vllm")


def test_adapter_command_converts_and_merges(tmp_path, capsys):
    from moekit.cli.main import main

    base_folder, folder, peft_logits = _peft_adapter(tmp_path)
    old = tmp_path / "old"
    assert (
        main(["adapter", str(folder), str(old), "--base", str(base_folder), "--to", "peft-0.18"])
        == 0
    )
    assert "peft -> peft-0.18" in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert (
        main(["adapter", str(old), str(merged), "--base", str(base_folder), "--to", "merged"]) == 0
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(TOKENS).logits, peft_logits, rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert (
        main(
            [
                "adapter",
                str(tmp_path / "hf"),
                str(tmp_path / "x"),
                "--base",
                str(base_folder),
                "--to",
                "peft",
            ]
        )
        == 2
    )
    assert "not a PEFT adapter folder" in capsys.readouterr().err
