#!/usr/bin/env bash
# A/B of the float16 GEMV's launch rule inside the whole decode step: Llama-3-8B shape, float16,
# batch 1, context 512, triton rung (graphed), run new / old / new / old on one machine.
# "old" is the rule before the H200 sweep (256-wide K slices, 16-row blocks, split to ~4 programs an SM).
#   bash benchmarks/experiments/float_gemv_ab_gpu.sh OUT_DIR
#   RUNS="new1 old1" LOWGEAR_NO_PDL=1 bash benchmarks/experiments/float_gemv_ab_gpu.sh OUT_DIR   # plain launches, as before sm_90
set -uo pipefail
OUT="${1:?usage: bash benchmarks/experiments/float_gemv_ab_gpu.sh OUT_DIR}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
B="--preset llama3-8b --quant float --dtype float16 --batch 1 --context 512 --prefill 128 --rungs triton --no-peer --warmup 3 --iters 20"
for run in ${RUNS:-new1 old1 new2 old2}; do
  python3 - $B --out "$OUT/$run${LOWGEAR_NO_PDL:+-nopdl}" <<PY 2>&1 | grep "decode bs=1" | tail -1 | sed "s/^/$run: /"
import sys
from lowgear.ops.matmul import float_gemv as F
if "$run".startswith("old"):
    F.BLOCK_K, F.BLOCK_K_MANY_ROWS, F.TARGET_PROGRAMS = 256, 256, 4 * 132
from lowgear import cli
sys.argv = ["lowgear", "bench"] + sys.argv[1:]
cli.main()
PY
done
