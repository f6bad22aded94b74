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


def _option_helps():
    import argparse
    import re

    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        text = sub.format_help()
        blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[-1])
        yield (
            name,
            sub,
            blocks,
            [a for a in sub._actions if not isinstance(a, argparse._HelpAction)],
        )


def test_every_option_says_what_it_does_and_its_default_once():
    """Issue 30: finetune's flags hid their defaults, --data printed "(default: ...)" twice."""
    for name, _, blocks, actions in _option_helps():
        for action in actions:
            assert action.help, (name, action.option_strings or action.dest)
        for block in blocks:
            assert block.count("(default:") <= 1, (name, block)
            assert "(default: None)" not in block and "(default: False)" not in block, (name, block)
    finetune = build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()
    assert "(default: 200)" in finetune and "(default: 16.0)" in finetune
    assert (
        "--lora-rank LORA_RANK\n                        add LoRA adapters of this rank (default: 0)"
        in finetune
    )
