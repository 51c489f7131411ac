#!/usr/bin/env bash
# The GPU run three GEMV-side choices for GGUF layers wait for: one zero row for layers with one zero a column
# (decision 013; on in this tree), 6-bit codes for 5/6-bit types (repack.SIX_BIT, decision 027; off) and tiles that
# hold several of GGUF's small groups (gptq_gemv.SPAN_GROUPS, decision 005; off).
# First the kernels' GPU tests against float64 (tests/test_quant_repack.py: every GGUF type with a GPTQ form, 8- and
# 6-bit codes, spanning tiles, through the GEMV, the tl.dot kernel and the dequantizer; the mma.sync kernel's
# one-zero-row build), then graphed decode steps of trees interleaved in one run (benchmarks/ab_trees_gpu.py):
# this one (`base`), a copy with SIX_BIT = True (`six`), one with SPAN_GROUPS = True (`span`) and, with NOZROW=1,
# one whose one_zero_row keeps every group's zero (`nozrow`: the zero row's own figure; four 8B Q6_K workers with
# batch-64 caches come near an 80 GB card), on synthetic Llama-3-8B Q6_K, Q4_0 and Q4_K, and the verdicts of
# benchmarks/held_bytes_decide.py (APPLY=1: the winners set in src/ for a bench after it).
# About 7 minutes on an H100; LIMIT=seconds cuts the A/B to fit a shorter command.
#
#   [APPLY=1] [NOZROW=1] [LIMIT=420] bash benchmarks/held_bytes_ab_gpu.sh OUT_DIR
set -uo pipefail
OUT="${1:?usage: bash benchmarks/held_bytes_ab_gpu.sh OUT_DIR}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/tests:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
timeout -s INT 120 python3 -m pytest -q -rf -p no:cacheprovider tests/test_quant_repack.py > "$OUT/repack_tests.log" 2>&1
echo "repack tests rc=$?"; tail -1 "$OUT/repack_tests.log"
timeout -s INT 50 python3 -m pytest -q -rf -p no:cacheprovider -m gpu -k one_zero_row tests/test_qmma_gpu.py \
    > "$OUT/qmma_zero_row_tests.log" 2>&1
echo "qmma zero-row tests rc=$?"; tail -1 "$OUT/qmma_zero_row_tests.log"
source benchmarks/variant.sh
six=$(variant ops/matmul/repack.py "SIX_BIT = False=>SIX_BIT = True") || exit 1
span=$(variant ops/matmul/gptq_gemv.py "SPAN_GROUPS = False=>SPAN_GROUPS = True") || exit 1
trees=(--tree base=src --tree six="$six" --tree span="$span")
if [ "${NOZROW:-0}" = 1 ]; then
    nozrow=$(variant formats/gptq.py "    if zeros.shape\[0\] <= 1:=>    if True:") || exit 1
    trees+=(--tree nozrow="$nozrow")
fi
timeout $((${LIMIT:-600} - SECONDS - 5)) python3 benchmarks/ab_trees_gpu.py "${trees[@]}" \
    --quants q6_k,q4_0,q4_k --batch 1,16,64 --context 512 --rounds 2 --steps 20 --out "$OUT/ab" 2>&1 | tee "$OUT/ab.log" | tail -12
python3 benchmarks/held_bytes_decide.py "$OUT" $([ "${APPLY:-0}" = 1 ] && echo --apply) | tee "$OUT/decide.log"
