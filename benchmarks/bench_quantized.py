"""Quantised experts, QLoRA and expert offload, measured (docs/quantization.md).

Sections (``--sections``, default all):

- ``quality``: for a trained MoE LM (the demo's) and an MoE upcycled from the demo's dense LM,
  validation loss, expert bytes and forward time of each expert format against full precision
  (int8, int4 with groups of 128 and 32, MXFP4), timed alternately in one process.
- ``qlora``: LoRA fine-tuning steps on a model whose experts are most of its bytes, on the
  full-precision bank and on the int4 bank, each in a fresh process: peak resident memory
  (``VmHWM``) and the bytes autograd saves for backward per step.
- ``offload``: greedy generation with the experts in the checkpoint file and a byte budget of
  10-100 % of the experts (LRU and LFU, prefetch on and off), each in a fresh process: tokens/s,
  cache hit rate, peak cache bytes and peak resident memory, against the resident model; every
  run's tokens are checked equal to the resident model's; on the demo MoE (real routing) and
  on a random MoE with 1.5 GiB of experts (memory). Writes docs/img/offload_budget_*.png.

Run: ``OMP_NUM_THREADS=2 python benchmarks/bench_quantized.py --moe runs/demo/moe --dense
runs/demo/dense`` after ``make demo`` (or ``moekit demo --out-dir runs/demo``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FORMATS = [("int8", 128), ("int4", 128), ("int4", 32), ("mxfp4", 32)]


def _rss_mib() -> float:
    """Peak resident memory of this process in MiB: ``VmHWM`` (``ru_maxrss`` would carry the
    parent's peak over fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _val_loss(model, batches: int, seq_len: int) -> float:
    from moekit.training.data import DataConfig, load_corpus
    from moekit.training.loop import evaluate

    _, stream = load_corpus(DataConfig(seq_len=seq_len))
    return evaluate(model, stream, batches, 8, seq_len)


def _forward_ms(models: dict, tokens: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median forward time of each model, the models taking turns in every round."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(tokens)  # warm up
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(tokens)
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def quality(args: argparse.Namespace) -> list[dict]:
    import copy

    from moekit.experts.quantized import QuantFormat, QuantizationConfig
    from moekit.training.finetune import load_source
    from moekit.training.quantize import expert_weight_bytes, quantize_experts
    from moekit.training.upcycle import upcycle

    sources = {"demo MoE LM": load_source(args.moe).eval()}
    if args.dense:
        sources["upcycled demo dense LM (8 experts, top-2)"] = upcycle(
            load_source(args.dense), 8, 2, seed=0
        ).eval()
    rows = []
    for label, full in sources.items():
        seq_len = min(128, full.config.max_seq_len)
        models = {"fp32": full}
        for fmt, group in FORMATS:
            q = quantize_experts(
                copy.deepcopy(full), QuantizationConfig(format=QuantFormat(fmt), group_size=group)
            ).eval()
            models[f"{fmt} g{group}"] = q
        tokens = torch.randint(0, full.config.vocab_size, (8, seq_len))
        ms = _forward_ms(models, tokens, args.rounds)
        base_loss = _val_loss(full, args.eval_batches, seq_len)
        for name, model in models.items():
            loss = base_loss if name == "fp32" else _val_loss(model, args.eval_batches, seq_len)
            rows.append(
                {
                    "model": label,
                    "experts": name,
                    "val_loss": round(loss, 4),
                    "loss_change": round(loss - base_loss, 4),
                    "expert_mib": round(expert_weight_bytes(model) / 2**20, 3),
                    "forward_ms": round(ms[name], 2),
                    "time_vs_fp32": round(ms[name] / ms["fp32"], 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _qlora_child(folder: str, steps: int) -> dict:
    """One fresh process: load the checkpoint, attach LoRA, train ``steps`` steps."""
    from moekit.adapters import LoRAConfig, add_lora, lora_parameters
    from moekit.models.checkpoint import from_pretrained

    before = _rss_mib()
    model = from_pretrained(folder)
    add_lora(model, LoRAConfig(rank=8, targets=["attention", "experts"]))
    optimizer = torch.optim.AdamW(lora_parameters(model).values(), lr=1e-3)
    loaded = _rss_mib()
    saved: list[int] = []
    tokens = torch.randint(0, model.config.vocab_size, (4, 256))
    for _ in range(steps):
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor, seen: dict[int, int] = seen) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                out.logits.reshape(-1, out.logits.shape[-1]), tokens[:, 1:].reshape(-1)
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        saved.append(sum(n for ptr, n in seen.items() if ptr not in params))
    return {
        "rss_before_mib": round(before, 1),
        "rss_after_load_mib": round(loaded, 1),
        "peak_rss_mib": round(_rss_mib(), 1),
        "training_peak_over_loaded_mib": round(_rss_mib() - loaded, 1),
        "saved_for_backward_mib": round(max(saved) / 2**20, 2),
    }


def qlora(args: argparse.Namespace) -> list[dict]:
    from moekit.experts.bank import ExpertConfig
    from moekit.experts.quantized import QuantFormat, QuantizationConfig
    from moekit.layers import MoEConfig
    from moekit.models import AttentionConfig, MoEPlacementConfig, TransformerConfig, TransformerLM
    from moekit.models.checkpoint import save_pretrained
    from moekit.training.quantize import expert_weight_bytes, quantize_experts

    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=256,
        d_model=512,
        n_layers=2,
        attention=AttentionConfig(n_heads=8),
        ffn_hidden=1024,
        max_seq_len=256,
        moe=MoEPlacementConfig(
            layer=MoEConfig(num_experts=16, top_k=2, experts=ExpertConfig(hidden=1024))
        ),
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = TransformerLM(config)
        folders = {"fp32 bank (LoRA)": Path(tmp) / "fp32", "int4 g128 bank (QLoRA)": None}
        save_pretrained(model, folders["fp32 bank (LoRA)"])
        full_bytes = expert_weight_bytes(model)
        quantize_experts(model, QuantizationConfig(format=QuantFormat.INT4, group_size=128))
        folders["int4 g128 bank (QLoRA)"] = Path(tmp) / "int4"
        save_pretrained(model, folders["int4 g128 bank (QLoRA)"])
        sizes = {
            "fp32 bank (LoRA)": full_bytes,
            "int4 g128 bank (QLoRA)": expert_weight_bytes(model),
        }
        del model
        for label, folder in folders.items():
            out = subprocess.run(
                [sys.executable, __file__, "--qlora-child", str(folder), "--steps", "3"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            row = {"bank": label, "expert_mib": round(sizes[label] / 2**20, 1)}
            row.update(json.loads(out.strip().splitlines()[-1]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _offload_child(folder: str, budget: int, policy: str, prefetch: bool, tokens: int) -> dict:
    from moekit.models import generate
    from moekit.models.checkpoint import from_pretrained
    from moekit.models.offload import load_offloaded

    prompt = torch.tensor([list(b"def main(argv):\n    ")], dtype=torch.long)
    if budget == 0:
        model = from_pretrained(folder).eval()
    else:
        model = load_offloaded(folder, budget=budget, policy=policy, prefetch=prefetch)
    with torch.no_grad():
        generate(model, prompt, 4)  # warm up (kernels, allocator)
        start = time.perf_counter()
        out = generate(model, prompt, tokens)
        seconds = time.perf_counter() - start
    row = {"tokens_per_s": round(tokens / seconds, 1), "peak_rss_mib": round(_rss_mib(), 1)}
    row["tokens"] = out[0].tolist()
    cache = getattr(model, "expert_cache", None)
    if cache is not None:
        cache.close()
        row.update(
            hit_rate=round(cache.stats.hit_rate, 4),
            peak_cache_mib=round(cache.stats.peak_bytes / 2**20, 3),
            prefetched=cache.stats.prefetched,
            prefetch_hits=cache.stats.prefetch_hits,
        )
    return row


def _synthetic_moe(gib: float):
    """A random MoE LM whose experts take about ``gib`` GiB (d_model 1024, 4 layers, top-2)."""
    from moekit.experts.bank import ExpertConfig
    from moekit.layers import MoEConfig
    from moekit.models import AttentionConfig, MoEPlacementConfig, TransformerConfig, TransformerLM

    per_expert = 3 * 1024 * 1536 * 4
    experts = max(4, round(gib * 2**30 / per_expert / 4))
    torch.manual_seed(0)
    return TransformerLM(
        TransformerConfig(
            vocab_size=256,
            d_model=1024,
            n_layers=4,
            attention=AttentionConfig(n_heads=8),
            ffn_hidden=1024,
            max_seq_len=512,
            moe=MoEPlacementConfig(
                layer=MoEConfig(num_experts=experts, top_k=2, experts=ExpertConfig(hidden=1536))
            ),
        )
    ).eval()


def offload(args: argparse.Namespace) -> list[dict]:
    from moekit.models.checkpoint import save_pretrained
    from moekit.training.finetune import load_source

    models = {"demo": lambda: load_source(args.moe)}
    if args.synthetic_gib:
        models["synthetic"] = lambda: _synthetic_moe(args.synthetic_gib)
    rows = []
    for name, build in models.items():
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / name
            model = build()
            save_pretrained(model, folder)
            model_rows = _offload_runs(args, name, model, folder)
            del model
        _plot(model_rows, Path(args.plot_dir) / f"offload_budget_{name}.png")
        rows += model_rows
    return rows


def _offload_runs(args: argparse.Namespace, name: str, model, folder: Path) -> list[dict]:
    from moekit.training.quantize import expert_weight_bytes

    total = expert_weight_bytes(model)
    layers = sum(1 for m in model.modules() if hasattr(m, "router") and hasattr(m, "experts"))
    per_expert = total // (layers * model.config.moe.num_experts)
    runs = [("resident", 0, "lru", False)]
    for share in args.budgets:
        budget = max(int(total * share), per_expert)
        runs += [(f"{share:.0%}", budget, p, f) for p in ("lru", "lfu") for f in (True, False)]
    rows: list[dict] = []
    reference = None
    for label, budget, policy, prefetch in runs:
        cmd = [sys.executable, __file__, "--offload-child", str(folder), "--budget", str(budget)]
        cmd += ["--policy", policy, "--tokens", str(args.tokens)]
        cmd += ["--prefetch"] if prefetch else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        generated = row.pop("tokens")
        reference = generated if reference is None else reference
        row = {
            "model": name,
            "budget": label,
            "budget_mib": round(budget / 2**20, 3),
            "expert_mib": round(total / 2**20, 3),
            "policy": policy if budget else "-",
            "prefetch": prefetch,
            "same_tokens_as_resident": generated == reference,
            **row,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    resident = next(r for r in rows if r["budget"] == "resident")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for policy in ("lru", "lfu"):
        for prefetch in (True, False):
            sel = [r for r in rows if r["policy"] == policy and r["prefetch"] == prefetch]
            if not sel:
                continue
            x = [r["budget_mib"] / r["expert_mib"] for r in sel]
            label = f"{policy}{' + prefetch' if prefetch else ''}"
            axes[0].plot(x, [r["hit_rate"] for r in sel], marker="o", label=label)
            axes[1].plot(x, [r["tokens_per_s"] for r in sel], marker="o", label=label)
            axes[2].plot(x, [r["peak_rss_mib"] for r in sel], marker="o", label=label)
    axes[1].axhline(resident["tokens_per_s"], color="gray", ls="--", label="all resident")
    axes[2].axhline(resident["peak_rss_mib"], color="gray", ls="--", label="all resident")
    titles = ("expert cache hit rate", "tokens / s (greedy, batch 1)", "peak RSS (MiB)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("budget / expert bytes")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moe", default="runs/demo/moe", help="a trained MoE run or checkpoint")
    parser.add_argument("--dense", default="runs/demo/dense", help="a dense run to upcycle")
    parser.add_argument("--sections", nargs="+", default=["quality", "qlora", "offload"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128, help="generated tokens per run")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--plot-dir", default="docs/img")
    parser.add_argument(
        "--synthetic-gib",
        type=float,
        default=1.5,
        help="also offload a random MoE with this many GiB of experts (0: skip)",
    )
    parser.add_argument("--out", default=None, help="write every row as JSON here")
    parser.add_argument("--qlora-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--offload-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--policy", default="lru", help=argparse.SUPPRESS)
    parser.add_argument("--prefetch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.qlora_child:
        print(json.dumps(_qlora_child(args.qlora_child, args.steps)))
        return
    if args.offload_child:
        row = _offload_child(
            args.offload_child, args.budget, args.policy, args.prefetch, args.tokens
        )
        print(json.dumps(row))
        return
    sections = {"quality": quality, "qlora": qlora, "offload": offload}
    results = {name: sections[name](args) for name in args.sections}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
