"""``moekit classic``: the classic mixtures and the training methods, measured side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = (
    "Train the 1991 mixture of experts by each training method (joint, separate, alternating, "
    "evolutionary), the hierarchical mixture by EM and by gradient, and a single network of "
    "about the same size, on scikit-learn's bundled data sets and a two-link arm; report "
    "epochs to a target score over seeds, and plots."
)
DATASETS = ("arm", "diabetes", "wine", "breast_cancer", "digits")


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--datasets", nargs="+", default=list(DATASETS), choices=DATASETS, help="tasks to run"
    )
    parser.add_argument("--seeds", type=int, default=5, help="seeds per method")
    parser.add_argument("--experts", type=int, default=4, help="experts per mixture")
    parser.add_argument("--epochs", type=int, default=300, help="full-batch epochs")
    parser.add_argument("--budget", type=int, default=3000, help="CMA-ES loss evaluations")
    parser.add_argument(
        "--em-iterations", type=int, default=100, help="EM iterations of the EM-vs-gradient runs"
    )
    parser.add_argument(
        "--em-vs-gradient-epochs",
        type=int,
        default=3000,
        help="the most gradient epochs allowed to reach EM's likelihood",
    )
    parser.add_argument(
        "--part",
        choices=("all", "methods", "em"),
        default="all",
        help="methods: the training-method table and plots; em: EM against gradient only",
    )
    parser.add_argument("--out", default="reports/classic", help="summary.md, results.json, PNGs")


def _fmt(value, digits: int = 0) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def run(args: argparse.Namespace) -> int:
    from moekit.analysis.plots import plot_gate_partition, plot_learning_curves
    from moekit.cli.classic_experiments import compare, summary_rows

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines, results = ["# Classic mixtures of experts: training methods side by side", ""], {}
    for dataset in args.datasets if args.part in ("all", "methods") else ():
        table = compare(
            dataset, seeds=args.seeds, experts=args.experts, epochs=args.epochs, budget=args.budget
        )
        rows = summary_rows(table)
        results[dataset] = {"target": table.target, "rows": rows}
        metric = "R²" if dataset in ("arm", "diabetes") else "accuracy"
        lines += [
            f"## {dataset} (validation {metric}; target {table.target:.3f} = 97% of the single "
            "network's median final score)",
            "",
            "| method | params | reached | epochs to target (median, range) | s to target | "
            "final (median, range) |",
            "|---|---:|---:|---|---:|---|",
        ]
        for r in rows:
            span = r["epochs_range"]
            lines.append(
                f"| {r['method']} | {r['parameters']} | {r['reached']} | "
                f"{_fmt(r['epochs_to_target'])} ({span[0]}-{span[1]}) | "
                if span
                else f"| {r['method']} | {r['parameters']} | {r['reached']} | — | "
            )
            lines[-1] += (
                f"{_fmt(r['seconds_to_target'], 2)} | {r['final']:.3f} "
                f"({r['final_range'][0]:.3f}-{r['final_range'][1]:.3f}) |"
            )
        lines.append("")
        curves = {m: runs[0].curve for m, runs in table.rows.items()}
        plot_learning_curves(curves, out / f"curves_{dataset}.png", metric, table.target)
        print(f"{dataset}: done ({len(rows)} methods x {args.seeds} seeds)")
    if args.part in ("all", "em"):
        lines += _em_vs_gradient_section(args, results)
    if args.part in ("all", "methods"):
        _gate_plot(out, plot_gate_partition)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n".join(lines))
    plots = ", curves_*.png, gates_iris.png" if args.part in ("all", "methods") else ""
    print(f"written: {out}/summary.md, results.json{plots}")
    return 0


def _em_vs_gradient_section(args: argparse.Namespace, results: dict) -> list[str]:
    from moekit.cli.classic_experiments import em_vs_gradient

    lines = [
        "## EM against gradient training of the same HME",
        "",
        "Same initial parameters; each trains until its training objective is within 0.001 "
        "nats per sample of what EM converges to (median and range over seeds).",
        "",
        "| data set | EM iterations | EM s | gradient epochs (reached) | gradient s | "
        "time ratio gradient/EM |",
        "|---|---|---:|---|---:|---:|",
    ]
    for dataset in args.datasets:
        r = em_vs_gradient(
            dataset,
            seeds=args.seeds,
            experts=args.experts,
            em_iterations=args.em_iterations,
            max_epochs=args.em_vs_gradient_epochs,
        )
        results.setdefault(dataset, {})["em_vs_gradient"] = r

        def cell(entry: dict, digits: int = 0) -> str:
            if entry["median"] is None:
                return "—"
            low, high = entry["range"]
            return f"{entry['median']:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"

        em_s, gd_s = r["em_seconds"]["median"], r["gradient_seconds"]["median"]
        ratio = f"{gd_s / em_s:.1f}" if em_s and gd_s else "—"
        lines.append(
            f"| {dataset} | {cell(r['em_iterations'])} | {cell(r['em_seconds'], 2)} | "
            f"{cell(r['gradient_epochs'])} ({r['gradient_reached']}) | "
            f"{cell(r['gradient_seconds'], 2)} | {ratio} |"
        )
        print(f"{dataset}: EM vs gradient done")
    return [*lines, ""]


def _gate_plot(out: Path, plot_gate_partition) -> None:
    """An HME classifier on iris petal length and width: which expert owns which region."""
    from sklearn.datasets import load_iris

    from moekit.classic.estimators import HMEClassifier

    iris = load_iris()
    X = iris.data[:, 2:4]
    model = HMEClassifier(depth=2, branching=2, random_state=0).fit(X, iris.target)
    plot_gate_partition(
        model.predict_gates, X, iris.target, out / "gates_iris.png", ("petal length", "petal width")
    )
