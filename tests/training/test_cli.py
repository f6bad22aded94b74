from pathlib import Path

from moekit.cli.main import main
from tests.builders import TINY_MOE


def test_train_eval_generate_from_the_command_line(tmp_path, tiny_text, capsys):
    config = tmp_path / "train.toml"
    config.write_text(f'[data]\npath = "{tiny_text}"\n')
    args = ["train", "--config", str(config), "--out-dir", str(tmp_path / "run"), "--quiet"]
    for item in TINY_MOE:
        args += ["--set", item]
    assert main(args) == 0
    assert "validation loss" in capsys.readouterr().out
    assert (
        main(
            [
                "eval",
                str(tmp_path / "run"),
                "--data",
                str(tiny_text),
                "--batches",
                "2",
                "--seq-len",
                "32",
            ]
        )
        == 0
    )
    assert "perplexity" in capsys.readouterr().out
    assert (
        main(["generate", str(tmp_path / "run"), "--prompt", "import ", "--max-new-tokens", "20"])
        == 0
    )
    assert capsys.readouterr().out.startswith("import ")
    args = ["generate", str(tmp_path / "run"), "--max-new-tokens", "5", "--experts-per-token"]
    assert main([*args, "1"]) == 0
    assert main([*args, "9"]) == 2
    assert "k must be in [1, 4]" in capsys.readouterr().err


def test_train_cli_reports_bad_config(tmp_path, capsys):
    assert main(["train", "--set", "optim.lr=-1", "--out-dir", str(tmp_path), "--quiet"]) == 2
    assert "optim.lr must be" in capsys.readouterr().err


def test_demo_tiny_runs_end_to_end(tmp_path, capsys):
    report = tmp_path / "report"
    assert (
        main(
            [
                "demo",
                "--preset",
                "tiny",
                "--quiet",
                "--out-dir",
                str(tmp_path / "runs"),
                "--report-dir",
                str(report),
                "--capacity-factor",
                "1.0",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "active/token" in out and "dense" in out and "moe" in out
    names = {p.name for p in report.iterdir()}
    assert {
        "summary.md",
        "val_loss.png",
        "expert_load_layer0.png",
        "expert_load_layer1.png",
        "load_percentiles.png",
        "dropped_fraction.png",
    } <= names
    summary = (report / "summary.md").read_text()
    assert "![Validation loss](val_loss.png)" in summary
    assert Path(report / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
