"""Mixtral <-> moekit: logits parity with transformers, export that transformers reloads."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import MixtralForCausalLM  # noqa: E402

from moekit.interop import from_hf, to_hf  # noqa: E402
from tests.interop.tiny_hf import mixtral as _hf_model  # noqa: E402


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("tied", [False, True])
def test_import_in_memory_matches_hf_logits(tied):
    hf = _hf_model(tie_word_embeddings=tied)
    ours = from_hf(hf).eval()
    tokens = torch.randint(0, 64, (2, 13))
    assert (_logits(ours, tokens) - _logits(hf, tokens)).abs().max() <= 1e-4


def test_export_reloads_in_transformers_and_reimports(tmp_path):
    hf = _hf_model()
    ours = from_hf(hf).eval()
    to_hf(ours, tmp_path / "export", "mixtral")
    reloaded = MixtralForCausalLM.from_pretrained(tmp_path / "export").eval()
    tokens = torch.randint(0, 64, (3, 9))
    assert (_logits(reloaded, tokens) - _logits(hf, tokens)).abs().max() <= 1e-4
    again = from_hf(tmp_path / "export").eval()  # the per-expert checkpoint layout
    assert torch.equal(_logits(again, tokens), _logits(ours, tokens))


def test_sharded_checkpoint_folder(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    ours = from_hf(tmp_path / "sharded").eval()
    tokens = torch.randint(0, 64, (1, 7))
    assert (_logits(ours, tokens) - _logits(hf, tokens)).abs().max() <= 1e-4


def test_errors_list_keys_and_families(tmp_path):
    hf = _hf_model()
    to_hf(from_hf(hf), tmp_path / "x", "mixtral")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "x" / "model.safetensors")
    state["model.layers.0.extra.weight"] = torch.zeros(1)
    del state["model.norm.weight"]
    save_file(state, tmp_path / "x" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['model\.norm\.weight'\].*unexpected"):
        from_hf(tmp_path / "x")
    config = json.loads((tmp_path / "x" / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "x" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no moekit converter yet"):
        from_hf(tmp_path / "x")
