"""Accounting of the hybrid families on their published shapes (issue 31): ``moekit params``
against the model cards, and the decoding state ``moekit plan`` reports (the KV cache of the
attention blocks only, the recurrent blocks' fixed state)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from moekit.analysis.params import count_parameters, spec_from_hf_config  # noqa: E402
from moekit.cli.main import main  # noqa: E402

LFM2_TYPES = ["full_attention" if i in (2, 6, 10, 14, 18, 21) else "conv" for i in range(24)]
# transformers' default configs are the flagship shapes (LFM2-8B-A1B's layer list added)
PUBLISHED = {
    "Qwen3-Next-80B-A3B": (lambda: transformers.Qwen3NextConfig(), 79.67e9, 3.87e9),
    "Qwen3.5/3.6-35B-A3B": (lambda: transformers.Qwen3_5MoeTextConfig(), 34.66e9, 3.45e9),
    "GLM-4.7-Flash": (lambda: transformers.Glm4MoeLiteConfig(), 29.94e9, 3.90e9),
    "LFM2-8B-A1B": (
        lambda: transformers.Lfm2MoeConfig(num_hidden_layers=24, layer_types=LFM2_TYPES),
        8.34e9,
        1.56e9,
    ),
}


PUBLISHED["Jamba-v0.1"] = (lambda: transformers.JambaConfig(), 51.57e9, 12.11e9)  # 52B / 12B
HF_CONFIGS = Path(__file__).parent / "hf_configs"


class _File:
    """A published config.json kept in ``hf_configs/`` (the text model of gemma-4-26B-A4B,
    written from public copies of its config: 25.2B total, 3.8B active on its card)."""

    def __init__(self, name: str) -> None:
        self.data = json.loads((HF_CONFIGS / name).read_text())

    def to_dict(self) -> dict:
        return self.data


PUBLISHED["gemma-4-26B-A4B"] = (lambda: _File("gemma-4-26b-a4b.json"), 25.23e9, 3.82e9)
# NVIDIA-Nemotron-3-Nano-30B-A3B's published config.json (its hybrid_override_pattern form),
# written from public copies of it: 31.6B total, 3.6B active with the embeddings (3.2B without)
# on its card; transformers' own count of the same config is 31,577,937,344
PUBLISHED["Nemotron-3-Nano-30B-A3B"] = (
    lambda: _File("nemotron-3-nano-30b-a3b.json"),
    31.578e9,
    3.58e9,
)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_hybrids_count_as_their_model_cards_say(name, tmp_path):
    make, total, active = PUBLISHED[name]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(make().to_dict()))
    report = count_parameters(path)
    assert report.total == pytest.approx(total, rel=2e-3)
    assert report.active == pytest.approx(active, rel=2e-3)


def test_plan_reports_the_decoding_state_of_a_hybrid(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(transformers.Qwen3NextConfig().to_dict()))
    spec = spec_from_hf_config(path)
    state = spec.decoding_state_bytes(32768, 2.0)
    # 12 attention blocks x keys and values of 2 heads x 256 x 32768 positions x 2 bytes
    assert state["kv_cache"] == 12 * 2 * 2 * 256 * 32768 * 2
    # 36 Gated DeltaNet blocks: a (8192 x 3) convolution state and 32 (128 x 128) states, fp32
    assert state["recurrent_state"] == 36 * (8192 * 3 + 32 * 128 * 128) * 4
    assert main(["plan", str(path), "--ep", "8", "--decode-context", "32768"]) == 0
    out = capsys.readouterr().out
    assert "KV cache 0.75 GiB (bf16), recurrent states 75.4 MiB" in out


def test_nemotron_3_nano_counts_exactly_what_transformers_builds():
    data = json.loads((HF_CONFIGS / "nemotron-3-nano-30b-a3b.json").read_text())
    report = count_parameters(HF_CONFIGS / "nemotron-3-nano-30b-a3b.json")
    assert report.total == 31_577_937_344  # transformers' count on the meta device
    assert report.active_non_embedding == pytest.approx(3.23e9, rel=2e-3)
    assert data["hybrid_override_pattern"].count("E") == 23
