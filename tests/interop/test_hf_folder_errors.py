"""Broken or unsupported Hugging Face folders get one clear message naming the file or key."""

import json

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from moekit.cli.main import main  # noqa: E402
from moekit.interop import from_hf  # noqa: E402
from tests.interop.tiny_hf import mixtral as tiny_mixtral  # noqa: E402


@pytest.fixture
def mixtral_folder(tmp_path):
    model = tiny_mixtral(max_position_embeddings=64)
    folder = tmp_path / "mixtral"
    model.save_pretrained(folder, max_shard_size="60KB")
    return folder


def _shards(folder):
    return sorted(folder.glob("*.safetensors"))


def test_sharded_folder_reads_only_the_indexed_files(mixtral_folder):
    assert (mixtral_folder / "model.safetensors.index.json").is_file()
    assert len(_shards(mixtral_folder)) > 1
    save_file({"junk": torch.zeros(3)}, str(mixtral_folder / "consolidated.safetensors"))
    from_hf(mixtral_folder)  # the stray consolidated file is not read


def test_truncated_shard_names_the_file(mixtral_folder, capsys, tmp_path):
    shard = _shards(mixtral_folder)[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{shard.name} is not a readable safetensors file"):
        from_hf(mixtral_folder)
    for command in (["convert", str(mixtral_folder), str(tmp_path / "out")],):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert shard.name in err and "Traceback" not in err


def test_missing_shard_is_named_from_the_index(mixtral_folder):
    shard = _shards(mixtral_folder)[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        from_hf(mixtral_folder)


def test_invalid_config_json_names_the_file(mixtral_folder):
    (mixtral_folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json:1: not valid JSON"):
        from_hf(mixtral_folder)


def test_config_that_disagrees_with_tensor_shapes_names_checkpoint_keys(mixtral_folder):
    path = mixtral_folder / "config.json"
    config = json.loads(path.read_text())
    config["intermediate_size"] = 40
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"do not match its config\.json") as info:
        from_hf(mixtral_folder)
    assert "model.layers.0." in str(info.value) and "w_in" not in str(info.value)


@pytest.mark.parametrize(
    "quantization",
    [
        {"quant_method": "fp8", "weight_block_size": [128, 128]},
        {"quant_method": "mxfp4"},
        {"quant_method": "bitsandbytes", "load_in_4bit": True},
        {"quant_method": "gptq", "bits": 4},
        {"quant_method": "awq", "bits": 4},
    ],
)
def test_quantised_configs_say_so(mixtral_folder, quantization):
    path = mixtral_folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = quantization
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"quantised.*{quantization['quant_method']}"):
        from_hf(mixtral_folder)


def test_quantised_tensors_without_a_config_entry_say_so(mixtral_folder):
    extra = {"model.layers.0.self_attn.q_proj.weight_scale_inv": torch.ones(1, 1)}
    save_file(extra, str(mixtral_folder / "scales.safetensors"))
    (mixtral_folder / "model.safetensors.index.json").unlink()  # read every file
    with pytest.raises(ValueError, match="is quantised"):
        from_hf(mixtral_folder)
