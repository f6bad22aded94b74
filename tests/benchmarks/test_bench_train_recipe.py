"""The training-recipe benchmark runs ``moekit train`` both ways, at a tiny size."""

from benchmarks.bench_train_recipe import main

TINY = ["--d-model", "32", "--layers", "2", "--experts", "4", "--seq-len", "16"]
TINY += ["--batch-size", "2", "--steps", "3", "--skip", "1", "--rounds", "1"]


def test_the_working_weights_comparison_runs(capsys):
    assert main(TINY) == 0
    out = capsys.readouterr().out
    assert "round 0: fp32" in out and "median ratio, bf16 / fp32:" in out


def test_the_working_weights_comparison_needs_bf16():
    import pytest

    with pytest.raises(SystemExit):
        main([*TINY, "--no-bf16"])
