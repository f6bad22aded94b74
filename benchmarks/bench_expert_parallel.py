"""Expert parallelism on one machine: tokens/s for EP = 1, 2, 4 gloo processes, split into
all-to-all and the rest, and the planner's predicted bytes against the bytes actually sent.

Workload: one training step (forward, backward, AdamW) of an MoE LM (d_model 256, 4 layers, all
MoE, 8 experts of width 512, top-2, sequences of 128 tokens) with the same global batch at every
EP degree (``--global-batch`` sequences, split evenly over the ranks). Experts are split over
the ranks (``parallelize_experts``) and everything else is data parallel (``wrap_data_parallel``,
DDP). The threads (``--threads``, the machine's cores by default) are shared out: each of the R
processes gets ``max(1, threads // R)``.

Per rank, ``moekit.distributed.meter_traffic`` counts the row bytes sent to other ranks and the
wall time inside the row all-to-alls (transfer plus waiting for slower ranks); the rest of the
step is compute, DDP's gradient all-reduce and the optimizer. The prediction is
``moekit.analysis.plan.plan_expert_parallel`` (uniform routing: a share (R-1)/R of each token's
k rows leaves its rank, 4 exchanges per MoE layer and step).

    python benchmarks/bench_expert_parallel.py
    python benchmarks/bench_expert_parallel.py --degrees 1 2 --steps 5 --global-batch 16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moekit
from moekit.analysis.params import spec_from_moekit
from moekit.analysis.plan import plan_expert_parallel
from moekit.distributed import meter_traffic
from moekit.distributed.ddp import parallelize_experts, wrap_data_parallel
from moekit.models import MoEPlacementConfig, TransformerConfig, TransformerLM
from moekit.models.common.attention import AttentionConfig

SEQ_LEN = 128


def lm_config() -> TransformerConfig:
    layer = moekit.MoEConfig(
        num_experts=8,
        top_k=2,
        experts=moekit.ExpertConfig(hidden=512),
        statistics=False,
    )
    return TransformerConfig(
        vocab_size=256,
        d_model=256,
        n_layers=4,
        attention=AttentionConfig(n_heads=4),
        ffn_hidden=512,
        max_seq_len=SEQ_LEN,
        moe=MoEPlacementConfig(layer=layer),
    )


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(max(1, args.threads // world))
    distributed = world > 1
    if distributed:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = TransformerLM(lm_config())
    if distributed:
        model = wrap_data_parallel(parallelize_experts(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    per_rank = args.global_batch // world
    # each rank its own slice of the global batch (the same model on every rank: seed 0 above)
    data = torch.randint(
        0,
        256,
        (args.steps + args.warmup, per_rank, SEQ_LEN + 1),
        generator=torch.Generator().manual_seed(1000 + rank),
    )
    steps = []
    for i in range(args.warmup + args.steps):
        tokens = data[i]
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        with meter_traffic() as traffic:
            out = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                out.logits.flatten(0, 1), tokens[:, 1:].flatten()
            )
            (loss + out.aux_loss).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        if i >= args.warmup:
            steps.append(
                {
                    "seconds": seconds,
                    "all_to_all_seconds": traffic.seconds,
                    "bytes_sent": traffic.bytes_sent,
                    "exchanges": traffic.exchanges,
                }
            )
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(steps, f)
    if distributed:
        del model  # drop DDP's reducer while the group is alive (it sits in reference cycles)
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_degree(world: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        out_path = os.path.join(folder, "steps")
        mp.start_processes(
            worker, args=(world, _port(), args, out_path), nprocs=world, start_method="spawn"
        )
        ranks = []
        for rank in range(world):
            with open(f"{out_path}.{rank}") as f:
                ranks.append(json.load(f))
    # a step lasts as long as its slowest rank; traffic is per rank, averaged over ranks
    step_seconds = [max(r[i]["seconds"] for r in ranks) for i in range(args.steps)]
    a2a = [statistics.mean(r[i]["all_to_all_seconds"] for r in ranks) for i in range(args.steps)]
    sent = [statistics.mean(r[i]["bytes_sent"] for r in ranks) for i in range(args.steps)]
    tokens_per_rank = args.global_batch // world * SEQ_LEN
    predicted = plan_expert_parallel(spec_from_moekit(lm_config()), world, tokens_per_rank, "fp32")
    median_step = statistics.median(step_seconds)
    return {
        "ep": world,
        "threads_per_rank": max(1, args.threads // world),
        "tokens_per_s": args.global_batch * SEQ_LEN / median_step,
        "step_s": median_step,
        "all_to_all_s": statistics.median(a2a),
        "all_to_all_share": statistics.median(
            a / s for a, s in zip(a2a, step_seconds, strict=True)
        ),
        "bytes_sent_per_rank": statistics.median(sent),
        "predicted_bytes_per_rank": predicted.all_to_all_bytes_per_step,
        "exchanges": ranks[0][0]["exchanges"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--global-batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    rows = [run_degree(world, args) for world in args.degrees]
    base = rows[0]["tokens_per_s"]
    print(
        f"global batch {args.global_batch} x {SEQ_LEN} tokens, {args.threads} threads shared, "
        f"gloo, medians of {args.steps} steps"
    )
    print(
        "EP  threads/rank  tokens/s  vs EP1  step s  all-to-all s (share)  "
        "sent MB/rank  predicted MB  sent/predicted"
    )
    for row in rows:
        predicted = row["predicted_bytes_per_rank"]
        ratio = row["bytes_sent_per_rank"] / predicted if predicted else float("nan")
        print(
            f"{row['ep']:2d}  {row['threads_per_rank']:12d}  {row['tokens_per_s']:8.0f}  "
            f"{row['tokens_per_s'] / base:6.2f}  {row['step_s']:6.3f}  "
            f"{row['all_to_all_s']:8.3f} ({row['all_to_all_share']:.0%})        "
            f"{row['bytes_sent_per_rank'] / 1e6:8.2f}  {predicted / 1e6:12.2f}  {ratio:14.2f}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
