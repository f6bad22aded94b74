"""Files a killed or damaged run leaves behind never block resuming silently or confusingly."""

import json

import pytest

from moekit.training import load_train_config, train
from moekit.training.checkpoint import latest_checkpoint
from moekit.training.data import read_documents
from tests.builders import TINY_MOE


def _config(tmp_path, text, extra=()):
    return load_train_config(
        None,
        [
            *TINY_MOE,
            "checkpoint_every=4",
            *extra,
            f"out_dir={tmp_path / 'run'}",
            f"data.path={text}",
        ],
    )


@pytest.fixture
def stopped_run(tmp_path, tiny_text):
    cfg = _config(tmp_path, tiny_text)
    train(cfg, progress=False, stop_after=6)
    return cfg, tmp_path / "run"


def test_torn_last_metrics_line_does_not_block_resume(stopped_run):
    cfg, run = stopped_run
    metrics = run / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 7, "loss": 1.2')  # killed mid-write
    resumed = train(cfg, progress=False, resume=True)
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 13))
    assert resumed.records[-1]["step"] == 12


def test_leftover_staging_folders_are_removed_on_the_next_start(stopped_run):
    cfg, run = stopped_run
    checkpoints = run / "checkpoints"
    (checkpoints / ".step_0000008.saving.abc123").mkdir()
    (checkpoints / ".step_0000004.old").mkdir()
    (checkpoints / ".latest.xyz.tmp").write_text("step_0000008")
    train(cfg, progress=False, resume=True)
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("content", ["", "\x00\x00", "../elsewhere"])
def test_damaged_latest_pointer_names_the_file(stopped_run, content):
    cfg, run = stopped_run
    (run / "checkpoints" / "latest").write_text(content)
    with pytest.raises(ValueError, match=r"checkpoints/latest is empty or damaged"):
        train(cfg, progress=False, resume=True)


@pytest.mark.parametrize("content", ["", '{"step": 4, "optim'])
def test_truncated_trainer_state_names_the_file(stopped_run, content):
    cfg, run = stopped_run
    folder = latest_checkpoint(run / "checkpoints")
    (folder / "trainer_state.json").write_text(content)
    with pytest.raises(ValueError, match=r"trainer_state\.json is truncated or damaged"):
        train(cfg, progress=False, resume=True)


def test_binary_training_data_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    with pytest.raises(ValueError, match="looks binary, not text"):
        read_documents(str(tmp_path / "model.safetensors"))
    text = tmp_path / "notes.txt"
    text.write_text("plain text, with ünïcödé\n" * 50)
    assert read_documents(str(text))[0][1].startswith("plain text")
