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


def test_example_in_a_pipe_prints_no_progress_bar_updates(capsys):
    """Issue 30: outside a terminal, a bar's redraws flooded the pipe with updates."""
    assert main(["example", "--steps", "40", "--batch", "16", "--d-model", "8"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err, err[:500]


def test_quiet_silences_the_libraries_bars():
    from transformers.utils import logging as hf_logging

    from moekit.utils.progress import quiet_third_party_bars

    hf_logging.enable_progress_bar()
    quiet_third_party_bars()
    try:
        assert not hf_logging.is_progress_bar_enabled()
        import os

        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    finally:
        hf_logging.enable_progress_bar()
