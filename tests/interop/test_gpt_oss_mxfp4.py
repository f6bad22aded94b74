"""GPT-OSS as OpenAI ships it: MXFP4 experts import into a quantised bank in their published
layout, compute what transformers computes from the same file, and export back bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit.experts.quantized import QuantizationConfig, QuantizedExpertBank, quantize_weight
from moekit.interop import from_hf, to_hf

transformers = pytest.importorskip("transformers")

QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}


def _mxfp4_checkpoint(folder):
    """A tiny random GPT-OSS saved the way the released checkpoints are: experts in MXFP4."""
    config = transformers.GptOssConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "sinks" in name or "bias" in name or "router" in name:
                param.normal_(std=0.5)
            if name.endswith(("gate_up_proj", "down_proj")):
                param.normal_(std=0.3)
    model.save_pretrained(folder)
    state = load_file(str(folder / "model.safetensors"))
    mxfp4 = QuantizationConfig(format="mxfp4", group_size=32)
    for name in [n for n in state if n.endswith(("gate_up_proj", "down_proj"))]:
        blocks, scales = quantize_weight(state.pop(name), mxfp4)
        state[f"{name}_blocks"], state[f"{name}_scales"] = blocks, scales
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf_config = json.loads((folder / "config.json").read_text())
    hf_config["quantization_config"] = QUANTIZATION_CONFIG
    (folder / "config.json").write_text(json.dumps(hf_config))
    return folder


def _logits(model, tokens):
    with torch.no_grad():
        return model.eval()(tokens).logits


@pytest.fixture(autouse=True)
def _dequantising_transformers(monkeypatch):
    """transformers dequantises MXFP4 on the CPU unless Triton and the ``kernels`` package are
    both installed, when it fetches its kernels from the Hub (no network here): dequantise."""
    quantizer = pytest.importorskip("transformers.quantizers.quantizer_mxfp4")
    monkeypatch.setattr(quantizer, "is_kernels_available", lambda *a, **k: False)


@pytest.mark.filterwarnings("ignore")
def test_mxfp4_gpt_oss_imports_exports_and_matches_transformers(tmp_path):
    folder = _mxfp4_checkpoint(tmp_path / "gpt_oss_mxfp4")
    ours = from_hf(folder)
    banks = [m for m in ours.modules() if isinstance(m, QuantizedExpertBank)]
    assert len(banks) == 2 and banks[0].quantization.format.value == "mxfp4"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = _logits(theirs, tokens)
    assert (_logits(ours, tokens) - expected).abs().max() <= 1e-4
    to_hf(ours, tmp_path / "back", "gpt_oss")
    original, exported = (
        load_file(str(f / "model.safetensors")) for f in (folder, tmp_path / "back")
    )
    for name in (n for n in original if n.endswith(("_blocks", "_scales"))):
        assert torch.equal(exported[name], original[name]), name  # the same bytes
    back_config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back_config["quantization_config"]["quant_method"] == "mxfp4"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "back", dtype=torch.float32
    )
    assert (_logits(reloaded, tokens) - expected).abs().max() <= 1e-5


def test_other_quantisations_are_still_refused(tmp_path):
    folder = _mxfp4_checkpoint(tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quant_method='fp8'.*imports GPT-OSS quantised as mxfp4"):
        from_hf(folder)


def test_int4_experts_cannot_be_exported_to_a_family(tmp_path):
    from moekit.training.quantize import quantize_experts
    from tests.builders import tiny_lm

    model = tiny_lm(d_model=32, expert_hidden=32)
    quantize_experts(model, QuantizationConfig(format="int4", group_size=16))
    with pytest.raises(ValueError, match=r"cannot export as 'mixtral'.*quantization"):
        to_hf(model, tmp_path / "out", "mixtral")
