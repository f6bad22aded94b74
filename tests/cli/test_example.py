from moekit.cli.main import build_parser, main


def test_example_runs_and_prints_both_models(capsys):
    assert main(["example", "--steps", "5", "--batch", "64", "--d-model", "16"]) == 0
    out = capsys.readouterr().out
    assert "moe" in out and "dense" in out
    assert "tokens per expert" in out
    assert "cluster 0: expert" in out


def test_help_shows_defaults():
    help_text = build_parser()._subparsers._group_actions[0].choices["example"].format_help()
    assert "(default: 300)" in help_text
