"""Decoding speed: an MoE LM against its dense twins and the weight-traffic floor.

For d_model 512 and 1024 (4 layers, 8 experts, top-2, expert hidden = 2·d_model, so the dense
twin's FFN is 4·d_model wide): greedy KV-cached generation tokens/s at batch 1 and 8 of

- the MoE LM,
- its dense twin with the same active parameters (``active``),
- a dense model with as many parameters as the MoE has in total (``total``: FFN width
  ``E · expert hidden``),

and the floor: the bytes of weights one token must read (active weights, fp32) divided by the
memory bandwidth measured here (a large tensor copy, read + write bytes). The GEMV-only ceiling
times nothing but one row times each active weight matrix (``torch.mm``): what fp32 matrix-vector
products reach here, before attention, norms, routing or Python. Also ``transformers``'
``generate`` on the MoE exported as Mixtral. ``--compile-step`` adds the MoE and its
same-active twin decoding with a fixed-shape cache and the step compiled once
(``generate(..., compile_step=True)``: ``torch.compile``; CUDA graphs on CUDA), warmed up
before timing. Models alternate within each round; medians of rounds.

    python benchmarks/bench_decode.py
    python benchmarks/bench_decode.py --d-model 512 --rounds 3 --tokens 32
    python benchmarks/bench_decode.py --d-model 512 --batch 1 --rounds 3 --tokens 32 --no-hf \
        --compile-step
    python benchmarks/bench_decode.py --d-model 512 --layer-overhead   # µs per layer call

``--layer-overhead`` times only what an MoE layer's batch-1 call costs beyond arithmetic: the
layer with experts of hidden width 8 (routing, the direct expert path, bookkeeping) against a
dense FFN of hidden width 16, alternating, under ``moekit.serving`` and ``torch.no_grad()``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from moekit.analysis.params import count_parameters
from moekit.experts.bank import ExpertConfig
from moekit.layers import MoEConfig
from moekit.models import MoEPlacementConfig, TransformerConfig, TransformerLM, generate
from moekit.models.common.attention import AttentionConfig


def build(d_model: int, ffn_hidden: int, experts: int = 0) -> TransformerLM:
    layer = None
    if experts:
        layer = MoEConfig(
            num_experts=experts,
            top_k=2,
            experts=ExpertConfig(hidden=ffn_hidden),
            statistics=False,
        )
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=256,
        d_model=d_model,
        n_layers=4,
        attention=AttentionConfig(n_heads=8),
        ffn_hidden=ffn_hidden,  # unused by an all-MoE model; Mixtral wants it = expert width
        max_seq_len=512,
        moe=MoEPlacementConfig(layer=layer),
    )
    return TransformerLM(config).eval()


def bandwidth_bytes_per_s(size_mb: int = 256, rounds: int = 5) -> float:
    """Read+write bandwidth of a large fp32 copy (bytes moved per second)."""
    src = torch.empty(size_mb * 2**18)
    dst = torch.empty_like(src)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times)


def gemv_ceiling_tokens_per_s(model: TransformerLM, top_k: int = 2, rounds: int = 20) -> float:
    """Tokens/s if a batch-1 step did nothing but multiply one row by each weight matrix it
    reads (attention, router, the first ``top_k`` experts of each layer, LM head): the best
    this machine's fp32 GEMV allows, below the bandwidth floor."""
    products = []
    for name, w in model.named_parameters():
        if w.dim() == 3:  # stacked experts (E, in, out): x @ w[e] for k of them
            products += [(torch.randn(1, w.shape[1]), w[e]) for e in range(top_k)]
        elif w.dim() == 2 and not name.startswith("embed"):  # (out, in) linear weights
            products.append((torch.randn(1, w.shape[1]), w.t()))
    times = []
    with torch.no_grad():
        for _ in range(rounds):
            start = time.perf_counter()
            for x, w in products:
                torch.mm(x, w)
            times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def tokens_per_s(model, batch: int, new_tokens: int, compile_step: bool = False) -> float:
    prompt = [torch.randint(0, 256, (16,)) for _ in range(batch)]
    start = time.perf_counter()
    with torch.no_grad():
        generate(
            model,
            prompt if batch > 1 else prompt[0],
            new_tokens,
            temperature=0.0,
            compile_step=compile_step,
        )
    return batch * new_tokens / (time.perf_counter() - start)


class Compiled:
    """A model whose ``generate`` runs the compiled fixed-shape step (a row of the table)."""

    def __init__(self, model: TransformerLM) -> None:
        self.model = model


def hf_tokens_per_s(hf_model, batch: int, new_tokens: int) -> float:
    prompt = torch.randint(0, 256, (batch, 16))
    start = time.perf_counter()
    with torch.no_grad():
        hf_model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    return batch * new_tokens / (time.perf_counter() - start)


def layer_overhead_us(d_model: int, rounds: int, calls: int = 3000) -> tuple[float, float]:
    """Median µs per batch-1 call of an MoE layer with negligible experts and of a dense FFN
    of negligible width (see the module docstring)."""
    from moekit.experts.dense import FeedForward
    from moekit.layers import serving

    torch.manual_seed(0)
    layer = MoEConfig(
        num_experts=8, top_k=2, experts=ExpertConfig(hidden=8), statistics=False
    ).build(d_model=d_model)
    dense = FeedForward(d_model, 16, activation="swiglu")
    x = torch.randn(1, 1, d_model)

    def per_call(module: torch.nn.Module) -> float:
        for _ in range(200):
            module(x)
        start = time.perf_counter()
        for _ in range(calls):
            module(x)
        return (time.perf_counter() - start) / calls * 1e6

    times: dict[str, list[float]] = {"moe": [], "dense": []}
    with torch.no_grad(), serving(layer):
        for _ in range(rounds):
            times["moe"].append(per_call(layer.eval()))
            times["dense"].append(per_call(dense))
    return statistics.median(times["moe"]), statistics.median(times["dense"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    parser.add_argument(
        "--compile-step", action="store_true", help="add the compiled fixed-shape step's rows"
    )
    parser.add_argument(
        "--layer-overhead", action="store_true", help="only the layer call's overhead (µs)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.layer_overhead:
        for d in args.d_model:
            moe_us, dense_us = layer_overhead_us(d, args.rounds)
            print(
                f"d_model {d}, batch 1, medians of {args.rounds} rounds: MoE layer call "
                f"{moe_us:.1f} µs, dense FFN call {dense_us:.1f} µs, difference "
                f"{moe_us - dense_us:.1f} µs"
            )
        return
    bandwidth = bandwidth_bytes_per_s()
    print(f"memory bandwidth (copy): {bandwidth / 1e9:.1f} GB/s; fp32, {args.threads} threads")
    for d in args.d_model:
        models: dict[str, TransformerLM | Compiled] = {
            "moe": build(d, 2 * d, experts=8),
            "dense (same active)": build(d, 4 * d),
            "dense (same total)": build(d, 16 * d),
        }
        if args.compile_step:
            for name in ("moe", "dense (same active)"):
                compiled = Compiled(models[name])  # type: ignore[arg-type]
                for batch in args.batch:  # compile (once per batch shape) before timing
                    tokens_per_s(compiled.model, batch, 4, compile_step=True)
                models[f"{name}, compiled step"] = compiled
        hf = None
        if not args.no_hf:
            import transformers

            from moekit.interop.hf import to_hf

            with tempfile.TemporaryDirectory() as folder:
                to_hf(models["moe"], folder, "mixtral")  # type: ignore[arg-type]
                hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        report = count_parameters(models["moe"])  # type: ignore[arg-type]
        active_bytes = (report.active - report.breakdown["embeddings"]) * 4
        floor = bandwidth / active_bytes
        for batch in args.batch:
            rates: dict[str, list[float]] = {name: [] for name in models}
            if hf is not None:
                rates["transformers (Mixtral export)"] = []
            for _ in range(args.rounds):
                for name, model in models.items():
                    if isinstance(model, Compiled):
                        rate = tokens_per_s(model.model, batch, args.tokens, compile_step=True)
                    else:
                        rate = tokens_per_s(model, batch, args.tokens)
                    rates[name].append(rate)
                if hf is not None:
                    rates["transformers (Mixtral export)"].append(
                        hf_tokens_per_s(hf, batch, args.tokens)
                    )
            medians = {name: statistics.median(r) for name, r in rates.items()}
            print(
                f"\nd_model {d}, batch {batch}: tokens/s (median of {args.rounds} rounds; "
                "ratios are medians of per-round ratios)"
            )
            for name, rate in medians.items():
                ratio = statistics.median(
                    m / r for m, r in zip(rates["moe"], rates[name], strict=True)
                )
                print(f"  {name:32s} {rate:9.1f}   moe / this = {ratio:.2f}")
            if batch == 1:
                ceiling = gemv_ceiling_tokens_per_s(models["moe"])  # type: ignore[arg-type]
                print(
                    f"  weight-traffic floor             {floor:9.1f}   moe / floor = "
                    f"{medians['moe'] / floor:.2f}, same-active dense / floor = "
                    f"{medians['dense (same active)'] / floor:.2f}"
                )
                print(
                    f"  GEMV-only ceiling (moe weights)  {ceiling:9.1f}   ceiling / floor = "
                    f"{ceiling / floor:.2f}, moe / ceiling = {medians['moe'] / ceiling:.2f}"
                )


if __name__ == "__main__":
    main()
