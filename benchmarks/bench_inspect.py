"""Operating on trained MoE models: experts per token at run time, pruning and merging.

1. ``set_top_k``: validation loss and batch-1 decode tokens/s against k, on a byte-level MoE LM
   trained with top-2 (8 experts, an MoE every other block).
2. Shrinking: validation loss against the fraction of experts removed, by routing frequency,
   by REAP saliency and by merging, on the same model and on a tiny Hugging Face Llama
   upcycled to 8 experts and trained briefly.

Validation loss is on the held-out split of the embedded corpus; calibration batches come from
the training split. Timings alternate k values in one process (medians of rounds), fp32.

    python benchmarks/bench_inspect.py                       # ~10 min
    python benchmarks/bench_inspect.py --model reports/finetune/pre_moe   # reuse a trained LM
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

import moekit
from moekit.analysis.plots import _pyplot
from moekit.models.transformer.generate import generate
from moekit.training.compress import merge, prune
from moekit.training.config import TrainConfig
from moekit.training.data import (
    ByteTokenizer,
    DataConfig,
    TokenStream,
    read_documents,
    split_documents,
)
from moekit.training.finetune import load_source
from moekit.training.loop import evaluate
from moekit.utils.serialization import config_from_dict, config_to_dict

FRACTIONS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625)


def streams(seq_len: int) -> tuple[TokenStream, TokenStream]:
    train, val = split_documents(read_documents(None), DataConfig().val_fraction)
    return TokenStream(train, ByteTokenizer()), TokenStream(val, ByteTokenizer())


def val_loss(model, val: TokenStream, seq_len: int, batches: int) -> float:
    return evaluate(model, val, batches, 8, seq_len)


def decode_rate(model, k: int, tokens: int, rounds: int, ks: list[int]) -> dict[int, float]:
    """Batch-1 greedy decoding tokens/s per k, alternating k values within each round."""
    prompt = torch.tensor(ByteTokenizer().encode("def main():\n    "), dtype=torch.long)
    times: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(rounds):
        for k in ks:
            moekit.set_top_k(model, k)
            start = time.perf_counter()
            generate(model, prompt, tokens, temperature=0.0)
            times[k].append(time.perf_counter() - start)
    moekit.set_top_k(model, k)
    return {k: tokens / statistics.median(t) for k, t in times.items()}


def top_k_curve(model, val: TokenStream, args) -> list[dict]:
    trained_k = model.blocks[-1].ffn.top_k
    E = model.blocks[-1].ffn.num_experts
    ks = [k for k in (1, 2, 3, 4, 6, 8) if k <= E]
    rates = decode_rate(model, trained_k, args.decode_tokens, args.rounds, ks)
    rows = []
    for k in ks:
        moekit.set_top_k(model, k)
        loss = val_loss(model, val, args.seq_len, args.val_batches)
        rows.append({"k": k, "val_loss": loss, "decode_tokens_per_s": rates[k]})
        print(f"k={k}: val loss {rows[-1]['val_loss']:.4f}, {rates[k]:.0f} tokens/s")
    moekit.set_top_k(model, trained_k)
    return rows


def shrink_curve(model, train: TokenStream, val: TokenStream, args) -> dict[str, list]:
    calibration = [x for x, _ in train.eval_batches(args.calibration, 8, args.seq_len)]
    curves: dict[str, list] = {"frequency": [], "saliency": [], "merge": []}
    for fraction in FRACTIONS:
        for method in curves:
            if method == "merge":
                smaller, _ = merge(model, calibration, fraction)
            else:
                smaller, _ = prune(model, calibration, fraction, method=method)
            loss = val_loss(smaller.eval(), val, args.seq_len, args.val_batches)
            curves[method].append((fraction, loss))
            print(f"{method} {fraction:.3f}: val loss {loss:.4f}")
    return curves


def upcycled_hf_model(args, out: Path):
    """A tiny random HF Llama with a byte vocabulary, upcycled to 8 experts, trained briefly."""
    import transformers

    from moekit.interop.hf import from_hf
    from moekit.models.checkpoint import save_pretrained
    from moekit.training.config import load_train_config
    from moekit.training.loop import train
    from moekit.training.upcycle import upcycle

    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    )
    llama.save_pretrained(out / "llama")
    moe = upcycle(from_hf(out / "llama"), 8, 2, noise_std=0.05)
    save_pretrained(moe, out / "upcycled")
    steps = args.upcycled_steps
    config = load_train_config(
        None,
        [
            f"steps={steps}",
            f"out_dir={out / 'upcycled_run'}",
            "data.seq_len=128",
            "data.batch_size=8",
            "eval_batches=4",
            f"eval_every={steps}",
        ],
    )
    data = config_to_dict(config)
    data["model"] = config_to_dict(moe.config)
    data["finetune"] = {"init_from": str(out / "upcycled")}
    shutil.rmtree(out / "upcycled_run", ignore_errors=True)
    return train(config_from_dict(TrainConfig, data), progress=False).model


def plot(curves: dict[str, list], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=120)
    for name, points in curves.items():
        ax.plot([f for f, _ in points], [v for _, v in points], marker="o", label=name)
    ax.set_xlabel("fraction of experts removed")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="reports/finetune/pre_moe", help="a trained MoE LM run")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--calibration", type=int, default=8, help="calibration batches")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--upcycled-steps", type=int, default=300)
    parser.add_argument("--out", default="reports/inspect_bench")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = streams(args.seq_len)
    model = load_source(args.model).eval()
    results = {"top_k": top_k_curve(model, val, args)}
    results["shrink_demo_model"] = shrink_curve(model, train, val, args)
    plot(results["shrink_demo_model"], out / "shrink_moe_lm.png", "byte-level MoE LM (8 experts)")
    hf = upcycled_hf_model(args, out).eval()
    args.seq_len = min(args.seq_len, 128)
    results["shrink_upcycled_hf"] = shrink_curve(hf, train, val, args)
    plot(results["shrink_upcycled_hf"], out / "shrink_upcycled_llama.png", "upcycled tiny Llama")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
