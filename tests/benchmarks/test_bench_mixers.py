"""The chunked-vs-loop mixer benchmark runs, at a tiny size, with its correctness gate."""

from benchmarks.bench_mixers import main


def test_the_mixer_benchmark_runs(capsys):
    assert main(["--d-model", "64", "--batch", "1", "--seq", "16", "--rounds", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["gated_deltanet", "mamba2", "short_conv", "mamba"]
    assert all(float(r[-1]) < 1e-4 for r in rows)  # chunked and loop agree
