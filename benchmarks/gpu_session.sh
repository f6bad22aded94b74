#!/usr/bin/env bash
# One lent GPU's whole run for issue 32, prepared on the CPU (the device tool's `run` command):
#   bash benchmarks/gpu_session.sh             # on the GPU: under 10 minutes (one `run` call)
#   DRY=1 bash benchmarks/gpu_session.sh       # here: the same steps on the CPU, tiny shapes
# 1. wheels carried in .whl/ (liger-kernel is a pure-Python wheel; see the device tool's
#    README) are installed into /tmp/site; moekit runs from src/;
# 2. the shared GPU check (shared/gpu/gpu_check.py, or ../shared/gpu/gpu_check.py), its
#    correctness sections only (at most 3 minutes: its own benchmark repeats bench_gpu's);
# 3. bench_gpu.py: the correctness gates, the layer backends (PyTorch path, triton, liger,
#    transformers' block, the dense floor), decoding with the compiled step, and `moekit train`
#    with and without bf16 working weights. Logs and JSON go to $OUT (or /tmp/gpu_out).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
CHECK=""
for candidate in shared/gpu/gpu_check.py ../shared/gpu/gpu_check.py; do
    [ -f "$candidate" ] && CHECK=$candidate && break
done
if [ -n "${DRY:-}" ]; then
    CHECK_ARGS=(--device cpu --tiny)
    BENCH_ARGS=(--device cpu --tiny --no-hf)
else
    CHECK_ARGS=(--sections env probe layer lm)
    BENCH_ARGS=(--budget 330)
fi
status=0
if [ -n "$CHECK" ]; then
    timeout 180 "$PY" "$CHECK" "${CHECK_ARGS[@]}" --json "$OUT/gpu_check.json" 2>&1 \
        | tee "$OUT/gpu_check.log" || status=1
else
    echo "gpu_check.py not found (shared/gpu or ../shared/gpu): skipped" | tee "$OUT/gpu_check.log"
fi
"$PY" benchmarks/bench_gpu.py --sections correct layer decode train "${BENCH_ARGS[@]}" \
    --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log" || status=1
exit $status
