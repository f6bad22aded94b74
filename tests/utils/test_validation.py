"""Config values are type- and range-checked when a config is built, naming the key."""

import json
import math
from pathlib import Path

import pytest

import moekit
from moekit.cli.main import main
from moekit.models import MoEPlacementConfig, TransformerConfig, TransformerLM
from moekit.models.checkpoint import from_pretrained, save_pretrained
from moekit.models.common.attention import AttentionConfig
from moekit.training.config import OptimConfig, load_train_config
from moekit.utils.validation import ConfigError
from tests.builders import placement

HF_CONFIGS = Path(__file__).parents[1] / "analysis" / "hf_configs"
MOE = [
    "model.moe.layer.num_experts=4",
    "model.moe.layer.top_k=2",
    "model.moe.layer.experts.hidden=8",
]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["steps=abc"], "steps must be an integer, got 'abc'"),
        (["data.batch_size=2.5"], "data.batch_size must be an integer, got 2.5"),
        ([*MOE, "model.moe.layer.router.noisy_gating=yes"], "noisy_gating must be true or false"),
        (["bf16=false1"], "bf16 must be true, false or 'auto'"),
        (["optim.lr=NaN"], "optim.lr must be a finite number"),
        (["optim.warmup_steps=Infinity"], "optim.warmup_steps must be an integer"),
        (["optim.grad_clip=NaN"], "optim.grad_clip must be a finite number"),
        ([*MOE, "model.moe.layer.router.routed_scaling_factor=Infinity"], "routed_scaling_factor"),
        (
            [*MOE, "model.moe.layer.dispatch.capacity_factor=NaN"],
            "capacity_factor must be a finite",
        ),
        (
            [*MOE, "model.moe.layer.router.bias_update_rate=NaN"],
            "bias_update_rate must be a finite",
        ),
        ([*MOE, "model.moe.layer.aux_loss.switch=-Infinity"], "aux_loss.switch must be a finite"),
        (["model.moe=5"], "model.moe must be a section of options"),
        ([*MOE, "model.moe.layer.router.kind=fancy"], "model.moe.layer.router.kind must be one of"),
        (["model.d_model=[1]"], "model.d_model must be an integer"),
        (["model.unknown=1"], "unknown TransformerConfig keys: model.unknown"),
    ],
)
def test_overrides_are_type_checked_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_train_config(None, overrides)
    assert message in str(info.value)


def test_json_strings_are_not_taken_as_bools(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"bf16": "false"}))
    with pytest.raises(ConfigError, match="bf16 must be true, false or 'auto', got 'false'"):
        load_train_config(str(path))


def test_direct_construction_refuses_non_finite_numbers():
    with pytest.raises(ConfigError, match="routed_scaling_factor must be a finite number"):
        moekit.RouterConfig(routed_scaling_factor=math.nan)
    with pytest.raises(ConfigError, match="grad_clip must be a finite number"):
        OptimConfig(grad_clip=math.inf)
    with pytest.raises(ConfigError, match="noisy_gating must be true or false"):
        moekit.RouterConfig(noisy_gating="yes")
    # enum values given as strings are still accepted, and become the member
    assert moekit.RouterConfig(gating="sigmoid_topk").gating.value == "sigmoid_topk"


def test_load_loss_with_every_expert_chosen_is_refused_when_built():
    with pytest.raises(ValueError, match=r"aux_loss\.load > 0 needs top_k < num_experts"):
        moekit.MoEConfig(
            num_experts=2,
            top_k=2,
            experts=moekit.ExpertConfig(hidden=8),
            router=moekit.RouterConfig(noisy_gating=True),
            aux_loss=moekit.AuxLossConfig(load=0.1),
        )


def test_saved_config_with_a_bad_value_names_the_key(tmp_path):
    config = TransformerConfig(
        vocab_size=32,
        d_model=16,
        n_layers=1,
        attention=AttentionConfig(n_heads=2),
        ffn_hidden=16,
        moe=placement(16, num_experts=2, top_k=1, expert_hidden=8),
    )
    folder = save_pretrained(TransformerLM(config), tmp_path / "m")
    data = json.loads((folder / "config.json").read_text())
    data["config"]["moe"]["layer"]["top_k"] = "two"
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"moe\.layer\.top_k must be an integer, got .two."):
        from_pretrained(folder)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_local_experts": 0}, "num_local_experts must be >= 1, got 0"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok=9 exceeds num_local_experts=8"),
        ({"hidden_size": "4096"}, "hidden_size must be an integer, got '4096'"),
    ],
)
def test_params_cli_refuses_impossible_hf_configs(tmp_path, capsys, change, message):
    data = json.loads((HF_CONFIGS / "mixtral-8x7b.json").read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**data, **change}))
    assert main(["params", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_shows_a_traceback_only_for_bugs(monkeypatch, capsys):
    import moekit.cli.params as params_cli

    def broken(args):
        raise KeyError("internal")

    monkeypatch.setattr(params_cli, "run", broken)
    assert main(["params", "x"]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "bug in moekit" in err


def test_the_moe_layer_is_one_nested_section_whose_width_follows_the_model():
    """One spelling: the layer's options live under ``moe.layer`` (the flat keys of earlier,
    unreleased versions are refused by name), and its width is the model's."""
    from moekit.training.config import load_train_config
    from moekit.utils.serialization import config_from_dict, config_to_dict

    model = load_train_config(
        None,
        [*MOE, "model.moe.layer.top_k=1", "model.moe.layer.experts.bias=true", "model.moe.every=2"],
    ).model
    layer = model.moe.layer
    assert (layer.num_experts, layer.top_k, layer.experts.hidden) == (4, 1, 8)
    assert layer.experts.bias and model.moe.every == 2 and layer.d_model is None
    data = config_to_dict(model)
    assert "d_model" not in data["moe"]["layer"]
    assert config_from_dict(TransformerConfig, data) == model
    data["d_model"] = 96  # the MoE layer is built at the model's width
    data["attention"]["head_dim"] = None
    built = config_from_dict(TransformerConfig, data).build()
    assert built.blocks[1].ffn.d_model == 96
    with pytest.raises(ConfigError, match=r"unknown MoEPlacementConfig keys: model\.moe\.top_k"):
        load_train_config(None, [*MOE, "model.moe.top_k=1"])


def test_a_layer_of_another_width_is_refused():
    from moekit.utils.serialization import config_from_dict, config_to_dict

    data = config_to_dict(
        TransformerConfig(
            vocab_size=32,
            d_model=16,
            n_layers=1,
            attention=AttentionConfig(n_heads=2),
            ffn_hidden=16,
            moe=placement(16),
        )
    )
    data["moe"]["layer"]["d_model"] = 8  # an old file's key, now the model's
    with pytest.raises(
        ConfigError, match=r"moe\.layer\.d_model=8 differs from the model's d_model=16"
    ):
        config_from_dict(TransformerConfig, data)
    with pytest.raises(ValueError, match=r"moe\.every must be >= 1"):
        MoEPlacementConfig(every=0)
