"""torch.compile against eager on the CPU: an LM training step and batch-1 generation.

The model is the demo's MoE LM (d_model 128, 4 layers, 8 experts of hidden 256, top-2, byte
vocabulary) with routing statistics off; its dense twin (FFN hidden 512) is timed the same way.
Eager and compiled steps alternate in one process (after warm-up and compilation) and the
medians of per-round ratios are reported, fp32 on the CPU's threads.

    python benchmarks/bench_compile.py                  # training step and generation
    python benchmarks/bench_compile.py --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moekit.experts.bank import ExpertConfig
from moekit.layers import MoEConfig
from moekit.models import MoEPlacementConfig, TransformerConfig, TransformerLM, generate
from moekit.models.common.attention import AttentionConfig


def build(moe: bool) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(
        TransformerConfig(
            vocab_size=256,
            d_model=128,
            n_layers=4,
            attention=AttentionConfig(n_heads=4),
            ffn_hidden=512,
            max_seq_len=256,
            moe=MoEPlacementConfig(
                layer=MoEConfig(
                    num_experts=8,
                    top_k=2,
                    experts=ExpertConfig(hidden=256),
                    statistics=False,
                )
                if moe
                else None
            ),
        )
    )


def train_step(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    out = model(tokens)
    loss = F.cross_entropy(out.logits.flatten(0, 1), tokens.flatten()) + out.aux_loss
    loss.backward()
    for p in model.parameters():
        p.grad = None


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32")
    tokens = torch.randint(0, 256, (args.batch, args.seq_len))
    prompt = torch.randint(0, 256, (1, 16))
    for name, moe in (("moe", True), ("dense", False)):
        model = build(moe)
        compiled = torch.compile(model)
        start = time.perf_counter()
        train_step(compiled, tokens)  # compilation
        compile_s = time.perf_counter() - start
        train_step(model, tokens)
        ratios, eager_ms = [], []
        for _ in range(args.rounds):
            e = timed(lambda m=model: train_step(m, tokens))
            c = timed(lambda m=compiled: train_step(m, tokens))
            ratios.append(c / e)
            eager_ms.append(1000 * e)
        model.eval()
        with torch.no_grad():
            generate(compiled, prompt, args.new_tokens)  # compilation of decoding
            gen_ratios = []
            for _ in range(args.rounds):
                e = timed(lambda m=model: generate(m, prompt, args.new_tokens))
                c = timed(lambda m=compiled: generate(m, prompt, args.new_tokens))
                gen_ratios.append(c / e)
        print(
            f"{name:>5}: train step eager {statistics.median(eager_ms):.0f} ms, "
            f"compiled/eager {statistics.median(ratios):.2f} (compile {compile_s:.0f} s); "
            f"generation compiled/eager {statistics.median(gen_ratios):.2f}"
        )


if __name__ == "__main__":
    main()
