"""What the hybrid families add over the shared family tests (``test_more_families.py`` and
``test_family_tools.py`` run on them too): LoRA on the recurrent mixers exported to PEFT and
reloaded by ``peft``, the presets that train a recurrent mixer, and padded batches."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from moekit.adapters.lora import LoRAConfig, add_lora  # noqa: E402
from moekit.interop import from_hf  # noqa: E402
from moekit.interop.peft_adapters import export_peft_adapter  # noqa: E402
from moekit.training.presets import apply_selection, select_parameters  # noqa: E402
from tests.interop.tiny_families import FAMILIES  # noqa: E402

HYBRIDS = ["lfm2_moe", "qwen3_next", "qwen3_5_moe", "granitemoehybrid", "nemotron_h", "jamba"]
# issue 31's families: the hybrids and Gemma 4 (padding, quantize, expert offload)
NEW_FAMILIES = [*HYBRIDS, "gemma4_text"]
TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", HYBRIDS)
def test_lora_on_recurrent_mixers_exports_to_peft(name, tmp_path):
    hf = FAMILIES[name]()
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    model = from_hf(folder)
    add_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=["recurrent_mixers", "attention"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora" in n:
                p.normal_(0, 0.05)
    model.eval()
    if name == "nemotron_h":  # PEFT's own list refuses LoRA on Mamba's out_proj and conv1d
        with pytest.raises(ValueError, match="PEFT refuses LoRA on 'nemotron_h'"):
            export_peft_adapter(model, folder, tmp_path / "adapter")
        return
    export_peft_adapter(model, folder, tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = model(TOKENS).logits, adapted(TOKENS).logits
        plain = from_hf(folder).eval()(TOKENS).logits
    assert (ours - plain).abs().max() > 1e-4
    assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("name", HYBRIDS)
def test_the_recurrent_mixers_preset_trains_them_alone(name):
    model = from_hf(FAMILIES[name]())
    apply_selection(model, select_parameters(model, "recurrent_mixers"))
    model(TOKENS).logits.sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    recurrent = {
        n
        for n, _ in model.named_parameters()
        if n.startswith("blocks.")
        and ".attn." in n
        and not model.config.is_attention_layer(int(n.split(".")[1]))
    }
    assert trained == recurrent and trained


def _without_biases(name: str):
    """The family's tiny model without projection biases: with ``conv_bias`` transformers'
    LFM2 (and with ``mamba_proj_bias`` its Jamba) lets padding leak into the first real tokens
    (its zeroed padding gets the in-projection bias before the convolution; 1.4e-5 and 3e-4
    here), which moekit does not copy; the published checkpoints have no such biases."""
    if name == "lfm2_moe":
        config = FAMILIES[name]().config
        config.conv_bias = False
        torch.manual_seed(0)
        return transformers.Lfm2MoeForCausalLM(config).eval()
    if name == "jamba":  # the same leak through the Mamba in-projection's bias
        config = FAMILIES[name]().config
        config.mamba_proj_bias = False
        torch.manual_seed(0)
        return transformers.JambaForCausalLM(config).eval()
    return FAMILIES[name]()


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_a_left_padded_batch_matches_transformers(name):
    hf = _without_biases(name)
    ours = from_hf(hf).eval()
    mask = torch.ones_like(TOKENS)
    mask[0, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each sequence counts its real tokens
    with torch.no_grad():
        theirs = hf(TOKENS, attention_mask=mask, position_ids=positions).logits
        got = ours(TOKENS, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - theirs[real]).abs().max() <= 1e-5
    with torch.no_grad():  # and the padded row computes what the row alone computes
        alone = ours(TOKENS[:1, 4:]).logits
    assert (got[0, 4:] - alone[0]).abs().max() <= 1e-6


def test_a_vision_language_qwen3_5_checkpoint_loads_its_text_model(tmp_path):
    """The published Qwen3.5/3.6-MoE checkpoints carry a vision tower: the text model loads,
    with a warning that names what was left out, and computes what transformers' does."""
    text = FAMILIES["qwen3_5_moe"]().config.to_dict()
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        num_position_embeddings=16,
    )
    config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    hf = transformers.Qwen3_5MoeForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path / "vl")
    with pytest.warns(UserWarning, match=r"left out the vision tower \([\d,]+ parameters\)"):
        ours = from_hf(tmp_path / "vl").eval()
    with torch.no_grad():
        assert (ours(TOKENS).logits - hf(input_ids=TOKENS).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_quantize_and_expert_offload_run_on_each_hybrid(name, tmp_path):
    """Issue 31: `moekit quantize` and `generate --expert-budget` on every hybrid family (what
    the two commands call: quantize_experts, load_offloaded), with cached decoding."""
    from moekit.cli.quantize import default_group_size
    from moekit.experts.quantized import QuantFormat, QuantizationConfig
    from moekit.models import from_pretrained, generate, save_pretrained
    from moekit.models.offload import load_offloaded
    from moekit.training.quantize import quantize_experts

    model = from_hf(FAMILIES[name]()).eval()
    save_pretrained(model, tmp_path / "ckpt")
    with torch.no_grad():
        want = model(TOKENS).logits
        # offloaded experts, a budget of two experts' bytes: the same logits and decoding
        offloaded = load_offloaded(tmp_path / "ckpt", budget=2 * _expert_bytes(model)).eval()
        torch.testing.assert_close(offloaded(TOKENS).logits, want)
        prompt = TOKENS[:1, :5]
        greedy = dict(max_new_tokens=4, temperature=0.0)
        assert torch.equal(generate(offloaded, prompt, **greedy), generate(model, prompt, **greedy))
    group = default_group_size(model, "int8")
    quantize_experts(model, QuantizationConfig(format=QuantFormat("int8"), group_size=group))
    save_pretrained(model, tmp_path / "q8")
    again = from_pretrained(tmp_path / "q8").eval()
    with torch.no_grad():
        got = again(TOKENS).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # int8 rounding only


def _expert_bytes(model) -> int:
    from moekit.layers.switches import moe_layers

    bank = moe_layers(model)[0].experts
    return (bank.w_in_EDH[0].numel() + bank.w_out_EHD[0].numel()) * bank.w_in_EDH.element_size()


def test_a_family_finds_its_mixer_by_class_and_refuses_other_kinds(tmp_path):
    """Export finds the recurrent mixer by its class, whatever the pattern calls it, and refuses
    a hybrid whose blocks hold a mixer kind the family does not have, naming it."""
    import dataclasses

    from moekit.interop import to_hf
    from moekit.models.common.layout import TokenMixerLayout
    from tests.models.test_hybrid import hybrid_config

    hf = FAMILIES["qwen3_next"]()
    model = from_hf(hf).eval()
    layout = model.config.token_mixers
    renamed = TokenMixerLayout(
        pattern=["deltanet" if n != "attention" else n for n in layout.pattern],
        mixers={"deltanet": next(iter(layout.mixers.values()))},
    )
    model.config = dataclasses.replace(model.config, token_mixers=renamed)
    to_hf(model, tmp_path / "renamed", "qwen3_next")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "renamed").eval()
    with torch.no_grad():
        assert (reloaded(TOKENS).logits - hf(TOKENS).logits).abs().max() <= 1e-5
    mixed = hybrid_config().build()
    with pytest.raises(ValueError, match=r"GatedDeltaNetConfig blocks only; this one has Mamba2"):
        to_hf(mixed, tmp_path / "mixed", "qwen3_next")


def test_a_multimodal_gemma4_checkpoint_loads_its_text_model(tmp_path):
    """gemma-4-26B-A4B is published as a vision-language model (``gemma4``): the text model
    loads with a warning naming what was left out, and computes what transformers' does."""
    text = FAMILIES["gemma4_text"]().config.to_dict()
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
    )
    config = transformers.Gemma4Config(text_config=text, vision_config=vision, audio_config=None)
    torch.manual_seed(0)
    hf = transformers.Gemma4ForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path / "mm")
    with pytest.warns(UserWarning, match=r"left out the vision embedder .*the vision tower"):
        ours = from_hf(tmp_path / "mm").eval()
    with torch.no_grad():
        assert (ours(TOKENS).logits - hf(input_ids=TOKENS).logits).abs().max() <= 1e-5


def test_a_published_nemotron_h_config_json_imports_with_its_layer_pattern():
    """The Hub's Nemotron-3 config.json gives its layers as ``hybrid_override_pattern`` and
    carries keys transformers does not read (``norm_eps``, ``rope_theta``): the import takes
    the pattern as transformers does and computes the same logits."""
    import json
    from pathlib import Path

    import torch

    from moekit.interop.nemotron_h import config_from_hf

    published = Path(__file__).parents[1] / "analysis" / "hf_configs"
    data = json.loads((published / "nemotron-3-nano-30b-a3b.json").read_text())
    data.pop("torch_dtype")  # compare in fp32
    data.update(
        hidden_size=32, head_dim=8, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=24, moe_intermediate_size=16, moe_shared_expert_intermediate_size=24,
        n_routed_experts=8, num_experts_per_tok=2, mamba_num_heads=4, mamba_head_dim=8,
        ssm_state_size=8, n_groups=2, vocab_size=64, hybrid_override_pattern="ME*-M",
        num_hidden_layers=5,
    )  # fmt: skip
    config = config_from_hf(data)  # strict: every key classified
    assert [config.token_mixer_of_layer(i) is None for i in range(5)] == [
        False, True, False, True, False
    ]  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.NemotronHConfig(**data))
    hf = hf.eval()
    ours = from_hf(hf).eval()
    assert ours.config == config
    tokens = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert (ours(tokens).logits - hf(tokens).logits).abs().max() <= 1e-5
