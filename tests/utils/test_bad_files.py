"""Every bad file gets a clear error naming it (and the line), never a traceback or a silent
wrong answer: malformed configs, wrong top levels, Hugging Face keys, non-integers, huge
capacity factors, empty Soft MoE batches, inputs on another device, damaged weights."""

from __future__ import annotations

import json

import pytest
import torch

import moekit
from moekit.cli.main import main
from moekit.models.checkpoint import from_pretrained, save_pretrained
from moekit.utils.capacity import CAPACITY_LIMIT
from tests.builders import tiny_lm

BAD_CONFIGS = {
    "bad.toml": ("steps = 3\n[model\nd_model = 4\n", "bad.toml: not valid TOML"),
    "bad.yaml": ("steps: 3\n model: [\n", "bad.yaml:2: not valid YAML"),
    "bad.json": ('{"steps": 3,\n "x": }\n', "bad.json:2: not valid JSON"),
    "list.json": ("[1, 2]\n", "list.json: the top level must be a table of options"),
    "list.yaml": ("- 1\n- 2\n", "list.yaml: the top level must be a table of options"),
    "scalar.yaml": ("3\n", "scalar.yaml: the top level must be a table of options"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_malformed_train_configs_are_one_line_with_exit_2(tmp_path, capsys, name):
    text, message = BAD_CONFIGS[name]
    path = tmp_path / name
    path.write_text(text)
    assert main(["train", "--config", str(path), "--set", f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("name", ["bad.json", "list.json"])
def test_params_and_from_pretrained_name_a_bad_config_json(tmp_path, capsys, name):
    text, message = BAD_CONFIGS[name]
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(text)
    assert main(["params", str(folder)]) == 2
    assert message.replace(name, "config.json") in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"config\.json"):
        from_pretrained(folder)


@pytest.mark.parametrize(
    ("value", "message"),
    [("'x'", "must be an integer"), ("4.0", "must be an integer"), ("0", "must be >= 1")],
)
def test_params_names_the_hugging_face_key(tmp_path, capsys, value, message):
    config = {
        "model_type": "mixtral",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "num_local_experts": json.loads(value.replace("'", '"')),
        "num_experts_per_tok": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["params", str(tmp_path)]) == 2
    assert f"num_local_experts {message}" in capsys.readouterr().err


@pytest.mark.parametrize("value", [4.0, 1e20, True])
def test_non_integer_expert_counts_are_refused(value):
    with pytest.raises(ValueError, match="num_experts must be an integer"):
        moekit.MoEConfig(num_experts=value, top_k=2, experts=moekit.ExpertConfig(hidden=8))


@pytest.mark.parametrize("factor", [1e20, 1e308])
def test_huge_capacity_factors_mean_dropless(factor):
    torch.manual_seed(0)
    layer = moekit.MoEConfig(
        num_experts=4,
        top_k=2,
        experts=moekit.ExpertConfig(hidden=8),
        dispatch=moekit.DispatchConfig(mode="capacity", capacity_factor=factor),
    ).build(d_model=8)
    out = layer(torch.randn(6, 8))
    # the documented formula, bounded so it never overflows int64 (issue 33: it was clamped
    # to T·k = 12, which disagreed with the formula whenever the factor was at least E)
    assert out.stats.capacity == CAPACITY_LIMIT and float(out.stats.dropped_fraction) == 0.0
    chooser = moekit.MoEConfig(
        num_experts=4,
        top_k=1,
        experts=moekit.ExpertConfig(hidden=8),
        router=moekit.ExpertChoiceRouterConfig(capacity_factor=factor),
    ).build(d_model=8)
    assert chooser(torch.randn(6, 8)).output.shape == (6, 8)


@pytest.mark.parametrize("shape", [(0, 5, 8), (2, 0, 8), (0, 8)])
def test_soft_moe_on_an_empty_batch_returns_an_empty_output(shape):
    layer = moekit.MoEConfig(
        num_experts=4,
        top_k=1,
        experts=moekit.ExpertConfig(hidden=8),
        router=moekit.SoftRouterConfig(),
    ).build(d_model=8)
    assert layer(torch.randn(*shape)).output.shape == shape


def test_an_input_on_another_device_is_refused_naming_both():
    layer = moekit.MoEConfig(num_experts=4, top_k=2, experts=moekit.ExpertConfig(hidden=8)).build(
        d_model=8
    )
    with pytest.raises(ValueError, match="x is on meta but the layer's weights are on cpu"):
        layer(torch.empty(3, 8, device="meta"))


def test_flipped_weight_bytes_are_caught_naming_the_file(tmp_path, monkeypatch):
    folder = save_pretrained(tiny_lm(), tmp_path / "model")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight: safetensors still loads it
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors is damaged"):
        from_pretrained(folder)
    from_pretrained(folder, verify=False)  # the opt-out
    monkeypatch.setenv("MOEKIT_VERIFY_CHECKSUMS", "0")
    from_pretrained(folder)
