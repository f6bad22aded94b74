#!/usr/bin/env bash
# `moekit train` under bf16 two ways, one process at a time, alternating: bf16 working weights
# in one process (the default) against FSDP2's mixed-precision policy at world size 1
# (torchrun, one rank: FSDP2 casts the fp32 shards to bf16 at each all-gather). The model and
# batch are bench_train_recipe.py's defaults; each figure is the median tokens/s of a run's
# steps after the first two.
#   bash benchmarks/bench_working_weights_vs_fsdp.sh [rounds]     # rounds: default 3
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
ROUNDS=${1:-3}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
SETS=(--set bf16=true --set steps=8 --set eval_every=8 --set eval_batches=1 --set log_every=1
      --set data.seq_len=128 --set data.batch_size=8 --set optim.grad_accum=2
      --set model.d_model=512 --set model.n_layers=4 --set model.ffn_hidden=2048
      --set model.max_seq_len=128 --set model.attention.n_heads=8
      --set model.moe.layer.num_experts=8 --set model.moe.layer.top_k=2
      --set model.moe.layer.experts.hidden=512)
rate() {
    "$BIN/python" -c "
import json, statistics, sys
records = [json.loads(line) for line in open(sys.argv[1])]
print(round(statistics.median(r['tokens_per_second'] for r in records[2:])))" "$1/metrics.jsonl"
}
for round in $(seq 1 "$ROUNDS"); do
    rm -rf "$OUT/one" "$OUT/fsdp"
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$BIN/moekit" train "${SETS[@]}" \
        --out-dir "$OUT/one" --quiet > /dev/null
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$BIN/torchrun" --standalone --nproc_per_node 1 \
        -m moekit.cli.main train "${SETS[@]}" --out-dir "$OUT/fsdp" --quiet > /dev/null 2>&1
    one=$(rate "$OUT/one")
    fsdp=$(rate "$OUT/fsdp")
    echo "round $round: working weights $one tokens/s, FSDP2 mixed precision (world 1) $fsdp" \
        "tokens/s, ratio $("$BIN/python" -c "print(f'{$one / $fsdp:.3f}')")"
done
