"""The recurrent token mixers' chunked parallel form against their loop over positions (the
reference), on the CPU in fp32: forward + backward of one mixer layer, each form timed in
alternation within every round (median of rounds), with the largest output and gradient
difference between them as the correctness gate.

    python benchmarks/bench_mixers.py                       # d_model 256, B 4, S 256 and 1024
    python benchmarks/bench_mixers.py --seq 512 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moekit.models.mixers import GatedDeltaNetConfig, Mamba2Config, MambaConfig, ShortConvConfig


def mixers(d_model: int) -> dict:
    heads = max(d_model // 64, 1)
    return {
        "gated_deltanet": GatedDeltaNetConfig(
            n_key_heads=heads, n_value_heads=2 * heads, key_head_dim=64, value_head_dim=64
        ),
        "mamba2": Mamba2Config(n_heads=2 * heads, head_dim=64, state_dim=64, n_groups=1),
        "short_conv": ShortConvConfig(conv_width=3),
        "mamba": MambaConfig(expand=2, state_dim=16),
    }


def step(mixer: torch.nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor, list]:
    mixer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    y = mixer(x)
    y.square().mean().backward()
    elapsed = time.perf_counter() - start
    return elapsed, y.detach(), [p.grad.clone() for p in mixer.parameters()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="+", help="mixer kinds to time (default: all)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"CPU fp32, {torch.get_num_threads()} threads, d_model {args.d_model}, B {args.batch}")
    print(f"{'mixer':<16}{'S':>6}{'chunked ms':>12}{'loop ms':>10}{'speed-up':>10}{'max diff':>10}")
    for name, config in mixers(args.d_model).items():
        if args.only and name not in args.only:
            continue
        mixer = config.build(d_model=args.d_model, norm_eps=1e-6)
        for S in args.seq:
            x = torch.randn(args.batch, S, args.d_model)
            times: dict[bool, list[float]] = {False: [], True: []}
            results = {}
            for _ in range(args.rounds):
                for use_loop in (False, True):
                    mixer.use_loop = use_loop
                    elapsed, y, grads = step(mixer, x)
                    times[use_loop].append(elapsed)
                    results[use_loop] = (y, grads)
            (y_fast, g_fast), (y_loop, g_loop) = results[False], results[True]
            diff = max(
                float((y_fast - y_loop).abs().max()),
                *(float((a - b).abs().max()) for a, b in zip(g_fast, g_loop, strict=True)),
            )
            fast, loop = statistics.median(times[False]), statistics.median(times[True])
            print(
                f"{name:<16}{S:>6}{fast * 1e3:>12.1f}{loop * 1e3:>10.1f}"
                f"{loop / fast:>9.1f}x{diff:>10.1e}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
