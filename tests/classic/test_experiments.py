"""The measured comparison: data, the two-link arm's physics, and the CLI end to end (tiny)."""

import json
import math

import numpy as np

from moekit.cli.classic_experiments import two_link_arm
from moekit.cli.main import main


def test_two_link_arm_torques_follow_the_equations_of_motion():
    X, tau = two_link_arm(500, seed=1)
    assert X.shape == (500, 8) and tau.shape == (500, 2)
    np.testing.assert_allclose(np.hypot(X[:, 0], X[:, 1]), 1.0)  # (cos, sin) encodings
    assert np.isfinite(tau).all() and tau.std(axis=0).min() > 1.0
    # the second joint's torque by hand: m2 c2^2 + I2 = 0.16 + 0.0533.. for the 0.8 m rod
    cos2, sin2 = X[:, 2], X[:, 3]
    cos12 = X[:, 0] * cos2 - X[:, 1] * sin2  # cos(q1 + q2)
    dq1, ddq1, ddq2 = X[:, 4], X[:, 6], X[:, 7]
    inertia2 = 0.4**2 + 0.8**2 / 12
    expected = (
        (0.4**2 + 0.4 * cos2 + 0.8**2 / 12) * ddq1
        + inertia2 * ddq2
        + 0.4 * sin2 * dq1**2
        + 0.4 * 9.81 * cos12
    )
    np.testing.assert_allclose(tau[:, 1], expected, rtol=1e-9, atol=1e-9)
    assert math.isclose(inertia2, 0.2133333, rel_tol=1e-5)


def test_classic_cli_writes_the_table_and_plots(tmp_path, capsys):
    out = tmp_path / "classic"
    code = main(
        [
            "classic",
            "--datasets",
            "wine",
            "--seeds",
            "1",
            "--epochs",
            "6",
            "--budget",
            "40",
            "--em-iterations",
            "4",
            "--em-vs-gradient-epochs",
            "30",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    methods = {row["method"] for row in results["wine"]["rows"]}
    em = results["wine"]["em_vs_gradient"]
    assert 0 <= em["em_iterations"]["median"] <= 4 and em["gradient_reached"] in ("0/1", "1/1")
    assert "EM against gradient" in (out / "summary.md").read_text()
    assert methods == {
        "single",
        "joint",
        "separate",
        "alternating",
        "evolutionary",
        "hme_em",
        "hme_gradient",
    }
    summary = (out / "summary.md").read_text()
    assert "| hme_em |" in summary and "target" in summary
    assert (out / "curves_wine.png").stat().st_size > 1000
    assert (out / "gates_iris.png").stat().st_size > 1000
