"""Plots of training runs (matplotlib, headless): loss curves, expert-load heat maps, drops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    try:
        import matplotlib  # noqa: PLC0415 (optional: matplotlib)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 (optional: matplotlib)
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'moekit[report]'") from e
    return plt


def _save_line_plot(plt, fig, ax, ylabel: str, path: Path) -> Path:
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_val_loss(
    curves: dict[str, list[tuple[int, float]]], path: Path, target: float | None = None
) -> Path:
    """Validation loss against step, one line per run, optional horizontal target line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, points in curves.items():
        ax.plot(
            [s for s, _ in points], [v for _, v in points], marker="o", markersize=2.5, label=name
        )
    if target is not None:
        ax.axhline(
            target, color="grey", linestyle="--", linewidth=0.8, label=f"dense final ({target:.3f})"
        )
    return _save_line_plot(plt, fig, ax, "validation loss (nats/byte)", path)


def plot_expert_load(records: list[dict[str, Any]], layer: int, path: Path) -> Path:
    """Heat map of one MoE layer's share of routed tokens per expert over training."""
    plt = _pyplot()
    rows = [(r["step"], r["moe"][layer]["tokens_per_expert"]) for r in records if r.get("moe")]
    steps = [s for s, _ in rows]
    shares = [[c / max(sum(counts), 1) for c in counts] for _, counts in rows]
    num_experts = len(shares[0])
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=120)
    image = ax.imshow(
        list(map(list, zip(*shares, strict=True))),
        aspect="auto",
        cmap="viridis",
        extent=(steps[0], steps[-1], num_experts - 0.5, -0.5),
        vmin=0.0,
    )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("expert")
    ax.set_title(f"MoE layer {layer}: share of routed tokens (uniform = {1 / num_experts:.3f})")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_dropped_fraction(records: list[dict[str, Any]], path: Path) -> Path:
    """Dropped fraction of routed assignments per MoE layer over training."""
    plt = _pyplot()
    rows = [r for r in records if r.get("moe")]
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=120)
    for layer in range(len(rows[0]["moe"])):
        ax.plot(
            [r["step"] for r in rows],
            [r["moe"][layer]["dropped_fraction"] for r in rows],
            label=f"layer {layer}",
        )
    return _save_line_plot(plt, fig, ax, "dropped fraction", path)


def plot_learning_curves(
    curves: dict[str, list[float]], path: Path, ylabel: str, target: float | None = None
) -> Path:
    """Validation score against epoch, one line per training method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, label=name, linewidth=1.2)
    if target is not None:
        ax.axhline(
            target, color="grey", linestyle="--", linewidth=0.8, label=f"target {target:.3f}"
        )
    ax.set_xlabel("epoch (full-batch step, EM iteration or CMA-ES generation)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_gate_partition(
    gates_of: Any, x_N2: Any, labels_N: Any, path: Path, feature_names: tuple[str, str]
) -> Path:
    """Which expert's gate wins where in a 2-D input space (``gates_of(points (M, 2)) -> (M,
    K)`` gate probabilities), with the data on top."""

    plt = _pyplot()
    lo, hi = x_N2.min(axis=0), x_N2.max(axis=0)
    pad = 0.1 * (hi - lo)
    u, v = np.meshgrid(
        np.linspace(lo[0] - pad[0], hi[0] + pad[0], 200),
        np.linspace(lo[1] - pad[1], hi[1] + pad[1], 200),
    )
    winner = gates_of(np.stack([u.ravel(), v.ravel()], axis=1)).argmax(axis=1).reshape(u.shape)
    fig, ax = plt.subplots(figsize=(5.6, 4.4), dpi=120)
    ax.contourf(u, v, winner, levels=np.arange(winner.max() + 2) - 0.5, cmap="Pastel1", alpha=0.8)
    ax.scatter(
        x_N2[:, 0], x_N2[:, 1], c=labels_N, cmap="Set1", s=10, edgecolors="k", linewidths=0.2
    )
    ax.set_xlabel(feature_names[0])
    ax.set_ylabel(feature_names[1])
    ax.set_title("regions: the expert with the largest gate probability")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_load_percentiles(records: list[dict[str, Any]], path: Path) -> Path:
    """Per MoE layer over training: the busiest expert's load and the p5 (×ideal), so one hot
    or starved expert shows instead of hiding in a mean."""
    plt = _pyplot()
    rows = [r for r in records if r.get("moe") and "load" in r["moe"][0]]
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=120)
    for layer in range(len(rows[0]["moe"]) if rows else 0):
        steps = [r["step"] for r in rows]
        line = ax.plot(
            steps, [r["moe"][layer]["load"]["max"] for r in rows], label=f"layer {layer} max"
        )
        ax.plot(
            steps,
            [r["moe"][layer]["load"]["p5"] for r in rows],
            linestyle="--",
            color=line[0].get_color(),
            label=f"layer {layer} p5",
        )
    ax.axhline(1.0, color="grey", linewidth=0.8)
    return _save_line_plot(plt, fig, ax, "tokens per expert / ideal", path)
