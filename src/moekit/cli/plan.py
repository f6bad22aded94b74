"""``moekit plan``: per-rank memory and all-to-all traffic of an expert-parallel run."""

from __future__ import annotations

import argparse
import json
import sys

from moekit.analysis.params import BYTES_PER_PARAM
from moekit.analysis.plan import __doc__ as PLAN_ASSUMPTIONS
from moekit.analysis.plan import plan_expert_parallel

HELP = (
    "Estimate per-rank weight, gradient and optimizer memory and all-to-all bytes per step for "
    "a model config (HF config.json or moekit checkpoint) at one or more expert-parallel degrees."
)


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        help="a config.json (HF or moekit) or its folder, a run folder, a checkpoint folder, "
        "or a training config file (.toml/.yaml/.json)",
    )
    parser.add_argument(
        "--ep", type=int, nargs="+", default=[1, 2, 4, 8], help="expert-parallel degrees to compare"
    )
    parser.add_argument(
        "--tokens-per-rank",
        type=int,
        default=8 * 4096,
        help="tokens per rank per optimizer step (micro-batches x sequence)",
    )
    parser.add_argument(
        "--dtype", choices=["bf16", "fp32"], default="bf16", help="weight/activation dtype"
    )
    parser.add_argument(
        "--dp-shard",
        type=int,
        default=1,
        help="ranks FSDP2 shards the weights over (a multiple of each --ep; 1: dense weights "
        "replicated, as with DDP)",
    )
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="also build the real sharding on the meta device under a fake process group of "
        "--world ranks and report what rank 0 and the last rank hold (needs --world)",
    )
    parser.add_argument("--world", type=int, default=None, help="ranks to simulate")
    parser.add_argument(
        "--dp-replicate", type=int, default=1, help="replicas of the sharded model (simulation)"
    )
    parser.add_argument(
        "--decode-context",
        type=int,
        default=32768,
        help="context length for the decoding-state line (KV cache and recurrent states)",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:

    from moekit.analysis.params import spec_from_hf_config, spec_from_moekit
    from moekit.cli.sources import model_config_source

    data, moekit_config = model_config_source(args.config)
    spec = (
        spec_from_moekit(moekit_config) if moekit_config is not None else spec_from_hf_config(data)
    )
    if args.simulate:
        return _simulate(args, data, moekit_config, spec)
    plans, refused = [], []
    for ep in args.ep:  # a degree that does not fit is named; the others are still planned
        try:
            plans.append(
                plan_expert_parallel(
                    spec, ep, args.tokens_per_rank, args.dtype, dp_shard=args.dp_shard
                )
            )
        except ValueError as error:
            refused.append(f"--ep {ep}: {error}")
    for line in refused:
        print(f"moekit plan: skipped {line}", file=sys.stderr)
    if not plans:
        raise ValueError("no --ep degree fits this model: " + "; ".join(refused))
    if args.json:
        print(json.dumps([p.as_dict() for p in plans], indent=2))
        return 0
    gib = 2**30
    print(
        f"{spec.name}: {spec.moe_layers} MoE layers x {spec.num_experts} experts, top-"
        f"{spec.top_k}; {args.tokens_per_rank:,} tokens per rank per step, {args.dtype}; "
        f"dp_shard {args.dp_shard}"
    )
    print(
        f"{'EP':>4}{'params/rank':>14}{'weights GiB':>13}{'grads GiB':>11}{'AdamW GiB':>11}"
        f"{'total GiB':>11}{'all-to-all GiB/step':>21}"
    )
    for p in plans:
        print(
            f"{p.expert_parallel:>4}{p.params_per_rank / 1e9:>13.2f}B"
            f"{p.weight_bytes / gib:>13.1f}{p.gradient_bytes / gib:>11.1f}"
            f"{p.optimizer_bytes / gib:>11.1f}{p.total_bytes / gib:>11.1f}"
            f"{p.all_to_all_bytes_per_step / gib:>21.2f}"
        )
    state = spec.decoding_state_bytes(args.decode_context, BYTES_PER_PARAM[args.dtype])
    print(
        f"\ndecoding state per sequence at {args.decode_context:,} positions: KV cache "
        f"{state['kv_cache'] / gib:.2f} GiB ({args.dtype}), recurrent states "
        f"{state['recurrent_state'] / 2**20:.1f} MiB (float32, fixed whatever the context)"
    )
    print(
        "\nActivations are not included."
        + PLAN_ASSUMPTIONS.split("\n\n")[1]
        .replace("\n", " ")
        .replace("Assumptions (stated in the output):", " Assumptions:")
    )
    return 0


def _simulate(args: argparse.Namespace, data: dict, moekit_config, spec) -> int:
    """``--simulate``: the real sharding, rank 0 and the last rank, next to the analytic plan."""
    from moekit.distributed.mesh import ParallelConfig
    from moekit.distributed.simulate import simulate_rank

    if args.world is None:
        raise ValueError("--simulate needs --world N (the ranks to simulate)")
    if moekit_config is None:
        from moekit.interop.hf import FAMILIES

        family = FAMILIES.get(str(data.get("model_type")))
        if family is None:
            raise ValueError(f"--simulate cannot build model_type {data.get('model_type')!r}")
        moekit_config = family.config_from_hf(data, strict=False)
    gib = 2**30
    dp_shard = args.world // args.dp_replicate
    rows = []
    for ep in args.ep:
        parallel = ParallelConfig(ep=ep, dp_shard=dp_shard, dp_replicate=args.dp_replicate)
        plan = plan_expert_parallel(spec, ep, args.tokens_per_rank, args.dtype, dp_shard=dp_shard)
        for rank in sorted({0, args.world - 1}):
            sim = simulate_rank(
                moekit_config, parallel, world=args.world, rank=rank, dtype=args.dtype
            )
            rows.append({**sim.as_dict(), "planned_params": plan.params_per_rank})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{spec.name}: simulated on {args.world} ranks (dp_replicate {args.dp_replicate}, "
        f"dp_shard {dp_shard}), {args.dtype} weights"
    )
    print(
        f"{'EP':>4}{'rank':>6}{'params':>12}{'experts':>12}{'dense':>12}{'weights GiB':>13}"
        f"{'planned':>12}"
    )
    for r in rows:
        print(
            f"{r['ep']:>4}{r['rank']:>6}{r['params'] / 1e9:>11.3f}B"
            f"{r['expert_params'] / 1e9:>11.3f}B{r['dense_params'] / 1e9:>11.3f}B"
            f"{r['weight_bytes'] / gib:>13.2f}{r['planned_params'] / 1e9:>11.3f}B"
        )
    return 0
