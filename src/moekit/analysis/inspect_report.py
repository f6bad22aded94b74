"""``moekit inspect``'s outputs: ``report.json`` and a self-contained ``report.html`` (PNG plots
embedded as data URIs, no external files)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from moekit.analysis.plots import _pyplot
from moekit.utils.serialization import atomic_write_bytes, atomic_write_json


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _layer_figures(layer: dict[str, Any]) -> list[tuple[str, str]]:
    plt = _pyplot()
    figures = []
    counts = layer["tokens_per_expert"]
    ideal = sum(counts) / max(len(counts), 1) or 1.0
    fig, ax = plt.subplots(figsize=(6.4, 2.6), dpi=100)
    ax.bar(range(len(counts)), [c / ideal for c in counts])
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("expert")
    ax.set_ylabel("load / ideal")
    figures.append(("load per expert (1 = ideal)", _png(fig)))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(3.6, 3.2), dpi=100)
    image = ax.imshow(layer["coactivation"], cmap="viridis")
    fig.colorbar(image, ax=ax)
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    figures.append(("co-activation (tokens choosing both)", _png(fig)))
    plt.close(fig)
    hist = layer["margin_histogram"]
    if sum(hist):
        fig, ax = plt.subplots(figsize=(4.0, 2.6), dpi=100)
        ax.bar([i / len(hist) for i in range(len(hist))], hist, width=1 / len(hist), align="edge")
        ax.set_xlabel("k-th minus (k+1)-th router probability")
        ax.set_ylabel("tokens")
        figures.append(("routing margin", _png(fig)))
        plt.close(fig)
    return figures


def hot_set_lines(hot: dict[str, Any]) -> list[str]:
    """The hot-set measures as short lines (the CLI prints them; the HTML lists them)."""
    cover = ", ".join(
        f"{level} of routes by {c['pairs']} pairs ({c['share_of_pairs']:.0%})"
        for level, c in hot["coverage"].items()
    )
    lines = [f"hot set: {hot['pairs']} (layer, expert) pairs; {cover}"]
    for p in hot["next_layer_prediction"]:
        if p["top1_table_accuracy"] is None:
            continue
        lookahead = p["router_lookahead_recall"]
        lines.append(
            f"layer {p['from_layer']} -> {p['to_layer']}: top-1 predicted "
            f"{p['top1_table_accuracy']:.0%} (baseline {p['top1_baseline_accuracy']:.0%})"
            + ("" if lookahead is None else f", router lookahead recall {lookahead:.0%}")
        )
    total_mib = hot["expert_bytes_total"] / 2**20
    for h in hot["cache_hit_rate"]:
        share = (
            f"{h['share_of_expert_bytes']:.0%} of the experts' {total_mib:.2f} MiB"
            if h["share_of_expert_bytes"] < 1
            else f"every expert fits: they take {total_mib:.2f} MiB"
        )
        lines.append(
            f"budget {h['budget_bytes'] / 2**20:.2f} MiB ({share}): "
            f"hit rate LRU {h['lru_hit_rate']:.1%}, LFU {h['lfu_hit_rate']:.1%} "
            f"(batch-1 decoding of {hot['replayed_tokens']} tokens)"
        )
    return lines


def _hot_set_section(hot: dict[str, Any]) -> list[str]:
    items = "".join(f"<li>{html.escape(line)}</li>" for line in hot_set_lines(hot))
    return ["<h2>Hot set (expert offload)</h2><ul>", items, "</ul>"]


def write_inspect_report(report: dict[str, Any], out_dir: str | Path, title: str) -> Path:
    """Write ``report.json`` and ``report.html`` into ``out_dir``; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>",
        f"<h1>{html.escape(title)}</h1>",
        "<table><tr><th>layer</th><th>E</th><th>k</th><th>load min / p5 / p50 / p95 / max "
        "(×ideal)</th><th>dead</th><th>entropy (max)</th><th>margin p5 / p50</th>"
        "<th>dropped at capacity</th><th>MI(token; expert)</th></tr>",
    ]
    for layer in report["layers"]:
        load = layer["load_fraction_of_ideal"]
        margin = layer["margin_k_vs_k_plus_1"]
        parts.append(
            f"<tr><td>{html.escape(layer['name'])}</td><td>{layer['experts']}</td>"
            f"<td>{layer['top_k']}</td><td>{load['min']:.2f} / {load['p5']:.2f} / "
            f"{load['p50']:.2f} / {load['p95']:.2f} / {load['max']:.2f}</td>"
            f"<td>{layer['dead_experts']}</td><td>{layer['router_entropy']:.3f} "
            f"({layer['max_entropy']:.3f})</td><td>{margin['p5']:.3f} / {margin['p50']:.3f}</td>"
            f"<td>{layer['dropped_fraction_at_capacity']:.2%} "
            f"(factor {layer['capacity_factor']})</td>"
            f"<td>{layer['token_expert_mutual_information']:.3f}</td></tr>"
        )
    parts.append("</table>")
    if report.get("consecutive_layer_agreement"):
        parts.append("<h2>Agreement of consecutive layers (top-1 NMI)</h2><ul>")
        for a in report["consecutive_layer_agreement"]:
            parts.append(
                f"<li>{html.escape(' → '.join(a['layers']))}: "
                f"{a['top1_normalised_mutual_information']:.3f}</li>"
            )
        parts.append("</ul>")
    if report.get("hot_set"):
        parts.extend(_hot_set_section(report["hot_set"]))
    if report.get("counterfactual"):
        parts.append(
            "<h2>Counterfactual routing: each token's k-th expert swapped for the next-best"
            "</h2><table><tr><th>layer</th><th>mean loss change (nats)</th>"
            "<th>tokens that do better</th><th>their mean gain</th></tr>"
        )
        for c in report["counterfactual"]:
            parts.append(
                f"<tr><td>{html.escape(c['layer'])}</td><td>{c['mean_loss_change']:+.4f}</td>"
                f"<td>{c['better_fraction']:.1%}</td><td>{c['mean_gain_when_better']:.4f}</td></tr>"
            )
        parts.append("</table>")
    if report.get("differences"):
        parts.append("<h2>Routing differences</h2><ul>")
        for d in report["differences"]:
            parts.append(f"<li>{html.escape(d['layer'])}: {d['differing_fraction']:.2%}</li>")
        parts.append("</ul>")
    for layer in report["layers"]:
        parts.append(f"<h2>{html.escape(layer['name'])}</h2>")
        for caption, uri in _layer_figures(layer):
            parts.append(f"<figure><img src='{uri}'><figcaption>{caption}</figcaption></figure>")
        parts.append("<p>Tokens each expert takes most often relative to their base rate:</p><ul>")
        for e in layer["specialisation"]:
            tokens = ", ".join(
                f"{html.escape(json.dumps(t['token']))} ×{t['lift']}" for t in e["top_tokens"][:6]
            )
            classes = e.get("byte_class_lift")
            if classes:
                top = sorted(classes.items(), key=lambda kv: -kv[1])[:2]
                tokens += " — byte classes: " + ", ".join(f"{k} ×{v}" for k, v in top)
            parts.append(f"<li>expert {e['expert']}: {tokens or '—'}</li>")
        parts.append("</ul>")
    path = out / "report.html"
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path
