"""bf16 against fp32 on a CPU that has native bf16 (AVX512-BF16 or AMX): the MoE layer (moekit
and transformers' Mixtral block on the same weights) and the demo's MoE training step.

    OMP_NUM_THREADS=2 python benchmarks/bench_cpu_bf16.py
    OMP_NUM_THREADS=2 python benchmarks/bench_cpu_bf16.py --rounds 3 --tokens 2048  # quicker

Everything compared in one table is timed in one process, alternating, one call of each per
round; medians. The layer runs with bf16 parameters (``module.to(torch.bfloat16)``); the
training step runs the demo's MoE model (``moekit demo``'s default preset) with fp32 master
weights under bf16 autocast, as ``moekit train bf16=true`` does. Refuses to run on a CPU without
native bf16 (a bf16 matrix product ran ~80x slower than fp32 on an AVX2-only CPU here) unless
``--force``.
"""

from __future__ import annotations

import argparse
import copy as copy_module
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import moekit
from moekit.utils.device import cpu_has_native_bf16


def alternate(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ms of each function, timed one call of each per round."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def layer_table(tokens: int, experts: int, rounds: int, with_hf: bool) -> None:
    D, H, k = 512, 1024, 2
    torch.manual_seed(0)
    moe = moekit.MoEConfig(
        num_experts=experts,
        top_k=k,
        experts=moekit.ExpertConfig(hidden=H, activation="swiglu"),
        statistics=False,
    ).build(d_model=D)
    moe.losses_enabled = False
    modules: dict[str, tuple[torch.nn.Module, Callable]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        copy = copy_module.deepcopy(moe)  # the same weights in each dtype
        modules[f"moekit {str(dtype)[6:]}"] = (copy.to(dtype), lambda x, m=copy: m(x).output)
        if with_hf:
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

            cfg = MixtralConfig(
                hidden_size=D, intermediate_size=H, num_local_experts=experts, num_experts_per_tok=k
            )
            cfg._experts_implementation = "grouped_mm"  # its model default; alone: a loop
            block = MixtralSparseMoeBlock(cfg)
            with torch.no_grad():
                block.gate.weight.copy_(moe.router.weight_ED)
                block.experts.gate_up_proj.copy_(moe.experts.w_in_EDH.transpose(1, 2))
                block.experts.down_proj.copy_(moe.experts.w_out_EHD.transpose(1, 2))
            modules[f"HF {str(dtype)[6:]}"] = (
                block.to(dtype),
                lambda x, m=block: m(x.unsqueeze(0)).squeeze(0),
            )
    x32 = torch.randn(tokens, D)
    g32 = torch.randn(tokens, D)

    def fwd_bwd(module, fwd):
        dtype = next(module.parameters()).dtype
        x, g = x32.to(dtype), g32.to(dtype)

        def run():
            module.zero_grad(set_to_none=False)
            fwd(x.detach().requires_grad_(True)).backward(g)

        return run

    ms = alternate({n: fwd_bwd(m, f) for n, (m, f) in modules.items()}, rounds)
    base = ms["moekit float32"]
    print(f"\nlayer fwd+bwd, T={tokens} D={D} H={H} E={experts} k={k} (ms; ratio to moekit fp32):")
    for name, value in ms.items():
        print(f"  {name:16s} {value:9.1f}  {value / base:5.2f}x")


def train_step_table(rounds: int) -> None:
    from moekit.cli.demo import PRESETS, demo_train_configs
    from moekit.training import loop

    preset = PRESETS["default"]
    with tempfile.TemporaryDirectory() as out:
        runs = {}
        for bf16 in (False, True):
            _, moe_cfg = demo_train_configs(preset, out_dir=Path(out) / str(bf16))
            moe_cfg.bf16 = bf16
            moe_cfg.retain_freed_memory = True
            run = loop._set_up(moe_cfg, resume=False, stop_after=None)
            run.model.train()
            runs["bf16 autocast" if bf16 else "fp32"] = run
        steps = {name: (lambda run=run: loop.train_step(run, 0)) for name, run in runs.items()}
        ms = alternate(steps, rounds)
    tokens = preset["batch_size"] * preset["seq_len"]
    print(f"\ndemo MoE training step ({tokens} tokens; ms, tokens/s, ratio to fp32):")
    for name, value in ms.items():
        print(
            f"  {name:16s} {value:9.1f}  {tokens / value * 1e3:9,.0f}  {value / ms['fp32']:5.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--force", action="store_true", help="run without native bf16")
    args = parser.parse_args(argv)
    if not cpu_has_native_bf16() and not args.force:
        print(
            f"this CPU has no native bf16 ({torch.backends.cpu.get_cpu_capability()}): bf16 "
            "would be far slower than fp32 here; --force to run anyway",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, native bf16")
    for experts in args.experts:
        layer_table(args.tokens, experts, args.rounds, not args.no_hf)
    if not args.no_train:
        train_step_table(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
