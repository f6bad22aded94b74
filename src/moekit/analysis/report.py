"""The demo's report folder: PNG plots and a Markdown summary linking them."""

from __future__ import annotations

import math
from pathlib import Path

from moekit.analysis.plots import (
    plot_dropped_fraction,
    plot_expert_load,
    plot_load_percentiles,
    plot_val_loss,
)


def write_demo_report(comparison, report_dir: Path, settings: dict) -> Path:
    """Write plots and ``summary.md`` for a dense-vs-MoE ``Comparison``; returns the summary."""
    report_dir.mkdir(parents=True, exist_ok=True)
    images: list[tuple[str, str]] = []
    plot_val_loss(
        {"dense": comparison.dense.evals, "moe": comparison.moe.evals},
        report_dir / "val_loss.png",
        target=comparison.target,
    )
    images.append(("Validation loss", "val_loss.png"))
    moe_records = [r for r in comparison.moe.records if r.get("moe")]
    for layer in range(len(moe_records[0]["moe"]) if moe_records else 0):
        name = f"expert_load_layer{layer}.png"
        plot_expert_load(moe_records, layer, report_dir / name)
        images.append((f"Expert load, MoE layer {layer}", name))
    if moe_records and "load" in moe_records[0]["moe"][0]:
        plot_load_percentiles(moe_records, report_dir / "load_percentiles.png")
        images.append(("Expert load percentiles (max and p5, ×ideal)", "load_percentiles.png"))
    if any(m["dropped_fraction"] > 0 for r in moe_records for m in r["moe"]):
        plot_dropped_fraction(moe_records, report_dir / "dropped_fraction.png")
        images.append(("Dropped fraction", "dropped_fraction.png"))

    steps = comparison.moe_steps_to_dense_loss
    lines = [
        "# moekit demo: dense vs MoE at equal active parameters",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "",
        "| model | total params | active params / token | final val loss | val perplexity "
        "| tokens/s | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run, params in (
        ("dense", comparison.dense, comparison.dense_params),
        ("moe", comparison.moe, comparison.moe_params),
    ):
        lines.append(
            f"| {name} | {params.total:,} | {params.active:,} | {run.final_val_loss:.4f} | "
            f"{math.exp(run.final_val_loss):.3f} | {run.tokens_per_second:,.0f} | "
            f"{run.wall_time:.1f} |"
        )
    lines.append("")
    if steps is None:
        lines.append(
            f"The MoE model did not reach the dense model's final validation loss "
            f"({comparison.target:.4f}) within {comparison.dense_steps} steps."
        )
    else:
        lines.append(
            f"The MoE model reached the dense model's final validation loss "
            f"({comparison.target:.4f}) at step **{steps}** of "
            f"{comparison.dense_steps}: **{comparison.step_ratio:.2f}x** the dense "
            f"model's steps."
        )
        if comparison.time_ratio is not None:
            lines.append(
                f"In training time (evaluation excluded) that took **{comparison.time_ratio:.2f}x**"
                " the dense model's."
            )
    lines.append("")
    for title, name in images:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    summary = report_dir / "summary.md"
    summary.write_text("\n".join(lines))
    return summary
