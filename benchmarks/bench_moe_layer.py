"""Time the moekit MoE layer against a dense SwiGLU FFN and Hugging Face's Mixtral MoE block.

Workload (issue 2): fp32, 2 threads, d_model 512, expert hidden 1024, top-2, tokens 4096 and
16384, experts 8 and 64. The dense FFN has the same active FLOPs (hidden = k * expert hidden).
The three implementations are timed alternately in one process (these machines are noisy) and
the medians of the per-round ratios are reported. Parameter gradients are set to None between
steps (PyTorch's default; ``--grads zero`` zeroes them in place), the same for all three.
Forward peak memory is measured in a fresh subprocess per implementation (peak RSS during one
forward with autograd on, minus RSS before it).

    python benchmarks/bench_moe_layer.py                 # the full grid
    python benchmarks/bench_moe_layer.py --tokens 4096 --experts 8 --rounds 3
    python benchmarks/bench_moe_layer.py --dtype bfloat16   # on a CPU with native bf16

``--dtype bfloat16`` runs all four in bf16 (weights and inputs). It refuses to start on a CPU
without native bf16 (``moekit.utils.device.cpu_has_native_bf16``: an AVX2-only CPU runs bf16
matrix products about 80x slower than fp32, which would time the emulation, not the layer)
unless ``--force-emulated-bf16`` is given.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time

import torch

import moekit

D_MODEL, HIDDEN, TOP_K = 512, 1024, 2
HF_EXPERTS_IMPLEMENTATION = "grouped_mm"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build(impl: str, num_experts: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Return (module, forward) for 'moekit', 'dense', 'floor' or 'hf', sharing weights across
    implementations, with parameters in ``dtype``."""
    module, forward = _build_fp32(impl, num_experts, seed)
    return module.to(dtype), forward


def _build_fp32(impl: str, num_experts: int, seed: int):
    torch.manual_seed(seed)
    moe = moekit.MoEConfig(
        num_experts=num_experts,
        top_k=TOP_K,
        experts=moekit.ExpertConfig(hidden=HIDDEN, activation="swiglu"),
        aux_loss=moekit.AuxLossConfig(switch=0.0),
    ).build(d_model=D_MODEL)
    if impl == "moekit":
        return moe, lambda x: moe(x).output
    if impl == "dense":
        dense = moekit.FeedForward(D_MODEL, TOP_K * HIDDEN, activation="swiglu")
        return dense, dense
    if impl == "floor":
        floor = MatmulFloor(moe.experts.w_in_EDH.detach(), moe.experts.w_out_EHD.detach())
        return floor, floor
    if impl == "hf":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(
            hidden_size=D_MODEL,
            intermediate_size=HIDDEN,
            num_local_experts=num_experts,
            num_experts_per_tok=TOP_K,
            hidden_act="silu",
        )
        # Inside a loaded model transformers picks "grouped_mm" by default; a block built alone
        # would fall back to the eager per-expert loop, so set the model default explicitly.
        cfg._experts_implementation = HF_EXPERTS_IMPLEMENTATION
        block = MixtralSparseMoeBlock(cfg)
        with torch.no_grad():
            block.gate.weight.copy_(moe.router.weight_ED)
            block.experts.gate_up_proj.copy_(moe.experts.w_in_EDH.transpose(1, 2))
            block.experts.down_proj.copy_(moe.experts.w_out_EHD.transpose(1, 2))
        return block, lambda x: block(x.unsqueeze(0)).squeeze(0)
    raise ValueError(f"impl must be 'moekit', 'dense', 'floor' or 'hf', got {impl!r}")


class MatmulFloor(torch.nn.Module):
    """The GEMM floor: plain ``torch.mm`` over the layer's per-expert shapes, balanced load.

    Forward runs ``x_e @ w_in[e]`` then ``a_e @ w_out[e]`` for every expert on an equal share of
    the ``k * tokens`` rows; ``backward`` runs the four products of the backward pass (input and
    weight gradients of both matrices) and writes the weight gradients into fresh ``(E, ...)``
    buffers, as any implementation must. No routing, gather, scatter or activation.
    """

    def __init__(self, w_in_EDH: torch.Tensor, w_out_EHD: torch.Tensor) -> None:
        super().__init__()
        # buffers, so that ``.to(dtype)`` casts them
        self.register_buffer("w_in_EDH", w_in_EDH.clone())
        self.register_buffer("w_out_EHD", w_out_EHD.clone())

    def _slices(self, rows: int) -> list[slice]:
        E = self.w_in_EDH.shape[0]
        bounds = [rows * e // E for e in range(E + 1)]
        return [slice(a, b) for a, b in itertools.pairwise(bounds)]

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        x_MD = x_TD.detach().repeat(TOP_K, 1)  # each token's k rows
        H = self.w_out_EHD.shape[1]
        slices = self._slices(len(x_MD))
        h_MH = x_MD.new_empty(len(x_MD), self.w_in_EDH.shape[2])
        y_MD = torch.empty_like(x_MD)
        for e, rows in enumerate(slices):
            torch.mm(x_MD[rows], self.w_in_EDH[e], out=h_MH[rows])
            torch.mm(h_MH[rows, :H], self.w_out_EHD[e], out=y_MD[rows])
        self._saved = (x_MD, h_MH, slices)
        return y_MD

    def backward(self, g_MD: torch.Tensor) -> None:
        x_MD, h_MH, slices = self._saved
        H = self.w_out_EHD.shape[1]
        grad_w_in = torch.empty_like(self.w_in_EDH)
        grad_w_out = torch.empty_like(self.w_out_EHD)
        grad_h_MH = torch.empty_like(h_MH)
        grad_x_MD = torch.empty_like(x_MD)
        for e, rows in enumerate(slices):
            torch.mm(h_MH[rows, :H].t(), g_MD[rows], out=grad_w_out[e])
            torch.mm(g_MD[rows], self.w_out_EHD[e].t(), out=grad_h_MH[rows, :H])
            grad_h_MH[rows, H:] = grad_h_MH[rows, :H]
            torch.mm(x_MD[rows].t(), grad_h_MH[rows], out=grad_w_in[e])
            torch.mm(grad_h_MH[rows], self.w_in_EDH[e].t(), out=grad_x_MD[rows])
        self._saved = None


GRADS_TO_NONE = True


def time_once(module, forward, x: torch.Tensor, backward: bool) -> float:
    module.zero_grad(set_to_none=GRADS_TO_NONE)
    start = time.perf_counter()
    if backward:
        xg = x.detach().requires_grad_(True)
        y = forward(xg)
        if isinstance(module, MatmulFloor):
            module.backward(torch.ones_like(y))
        else:
            y.backward(torch.ones_like(y))
    else:
        with torch.no_grad():
            forward(x)
    return time.perf_counter() - start


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set size, to the current RSS


def peak_forward_memory(
    impl: str, tokens: int, experts: int, experts_impl: str, dtype: str = "float32"
) -> int:
    """Peak RSS increase (bytes) of one forward with autograd on, in a fresh process."""
    code = (
        "import sys, torch; sys.path.insert(0, 'benchmarks');"
        "import bench_moe_layer as b; torch.set_num_threads(2);"
        f"b.HF_EXPERTS_IMPLEMENTATION = {experts_impl!r};"
        f"m, f = b.build({impl!r}, {experts}, dtype=b.DTYPES[{dtype!r}]);"
        f"x = torch.randn({tokens}, {D_MODEL}, dtype=b.DTYPES[{dtype!r}], requires_grad=True);"
        "b._reset_peak_rss(); before = b._status_kb('VmRSS'); y = f(x);"
        "print((b._status_kb('VmHWM') - before) * 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def check_same_outputs(tokens: int, experts: int) -> float:
    x = torch.randn(min(tokens, 512), D_MODEL)
    with torch.no_grad():
        ours = build("moekit", experts)[1](x)
        theirs = build("hf", experts)[1](x)
    return float((ours - theirs).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per workload")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers block")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--json", type=str, default=None, help="also write results here")
    parser.add_argument(
        "--hf-experts",
        default="grouped_mm",
        choices=["grouped_mm", "eager", "batched_mm"],
        help="transformers experts implementation (grouped_mm is its default in a model)",
    )
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="raise glibc's mmap/trim thresholds for all three (moekit.utils.allocator)",
    )
    parser.add_argument(
        "--grads",
        choices=["none", "zero"],
        default="none",
        help="between steps set parameter grads to None (PyTorch's default) or zero them in place",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--force-emulated-bf16",
        action="store_true",
        help="run --dtype bfloat16 even on a CPU without native bf16 (times the emulation)",
    )
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    if dtype == torch.bfloat16 and not args.force_emulated_bf16:
        from moekit.utils.device import cpu_has_native_bf16

        if not cpu_has_native_bf16():
            parser.error(
                f"--dtype bfloat16: this CPU has no native bf16 "
                f"(torch.backends.cpu.get_cpu_capability() = "
                f"{torch.backends.cpu.get_cpu_capability()}); its bf16 matrix products are "
                "emulated, about 80x slower than fp32. Use --dtype float32, run on a CPU with "
                "AVX512-BF16 or AMX, or pass --force-emulated-bf16"
            )
    global GRADS_TO_NONE
    GRADS_TO_NONE = args.grads == "none"
    if args.retain_freed_memory:
        from moekit.utils.allocator import retain_freed_memory

        print("glibc thresholds raised:", retain_freed_memory())
    global HF_EXPERTS_IMPLEMENTATION
    HF_EXPERTS_IMPLEMENTATION = args.hf_experts
    torch.set_num_threads(args.threads)
    impls = ["moekit", "dense", "floor"] + ([] if args.no_hf else ["hf"])
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.dtype}, d_model {D_MODEL}, "
        f"expert hidden {HIDDEN}, top-{TOP_K}; medians over {args.rounds} rounds"
    )
    rows = []
    for tokens in args.tokens:
        for experts in args.experts:
            if not args.no_hf:
                diff = check_same_outputs(tokens, experts)
                assert diff < 1e-4, f"moekit and HF outputs differ by {diff}"
            modules = {impl: build(impl, experts, dtype=dtype) for impl in impls}
            x = torch.randn(tokens, D_MODEL, dtype=dtype)
            row = {"tokens": tokens, "experts": experts}
            for backward in (False, True):
                for impl in impls:  # warm-up
                    time_once(*modules[impl], x, backward)
                times = {impl: [] for impl in impls}
                for _ in range(args.rounds):
                    for impl in impls:
                        times[impl].append(time_once(*modules[impl], x, backward))
                tag = "fwd_bwd" if backward else "fwd"
                for impl in impls:
                    row[f"{tag}_ms_{impl}"] = 1000 * statistics.median(times[impl])
                for other in impls[1:]:
                    ratios = [a / b for a, b in zip(times["moekit"], times[other], strict=True)]
                    row[f"{tag}_moekit_vs_{other}"] = statistics.median(ratios)
                    if other != "dense":
                        ratios = [a / b for a, b in zip(times[other], times["dense"], strict=True)]
                        row[f"{tag}_{other}_vs_dense"] = statistics.median(ratios)
            if not args.no_memory:
                for impl in [i for i in impls if i != "floor"]:
                    peak = peak_forward_memory(impl, tokens, experts, args.hf_experts, args.dtype)
                    row[f"fwd_peak_mb_{impl}"] = peak / 2**20
                row["fwd_memory_moekit_vs_dense"] = (
                    row["fwd_peak_mb_moekit"] / row["fwd_peak_mb_dense"]
                )
            rows.append(row)
            print(
                json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
            )
            sys.stdout.flush()

    print("\nratio = time(moekit) / time(other), median of per-round ratios")
    header = f"{'tokens':>7}{'E':>4}{'fwd/dense':>10}{'f+b/dense':>10}"
    if not args.no_hf:
        header += f"{'fwd/hf':>8}{'f+b/hf':>8}{'hf f+b/dense':>13}"
    if not args.no_memory:
        header += f"{'mem/dense':>10}"
    print(header)
    for r in rows:
        line = f"{r['tokens']:>7}{r['experts']:>4}"
        line += f"{r['fwd_moekit_vs_dense']:>10.2f}{r['fwd_bwd_moekit_vs_dense']:>10.2f}"
        if not args.no_hf:
            line += f"{r['fwd_moekit_vs_hf']:>8.2f}{r['fwd_bwd_moekit_vs_hf']:>8.2f}"
            line += f"{r['fwd_bwd_hf_vs_dense']:>13.2f}"
        if not args.no_memory:
            line += f"{r['fwd_memory_moekit_vs_dense']:>10.2f}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
