#!/usr/bin/env bash
# The GPU run three written-but-untimed choices of qmma.cu wait for (decision 026): the DQ build (17-64 rows),
# which gptq_matmul routes to once timed, the split-major split-K sum (SPLIT_MAJOR_SUM) and the persistent grid
# (PERSISTENT) for 4-16 rows.
# The kernel's tests against float64, the DQ build's per-layer time beside the tl.dot kernel, and whole decode
# steps of four trees interleaved in one run (same greedy tokens checked): this one, a copy with
# qmma.ROUTE_MAX_M = 64, one with that and SPLIT_MAJOR_SUM = True, and one with those and PERSISTENT = True.
# About 9 minutes on an H100; TABLE=0 (the per-layer table left out) fits one 600 s device command in about 7.
# The four trees' workers load at once and each holds an 8B model and its cache: about 60 GB of an 80 GB card.
#
#   [TABLE=0] [ALL_TESTS=1] [APPLY=1] bash benchmarks/qmma_dq_gpu.sh OUT_DIR
set -uo pipefail
OUT="${1:?usage: bash benchmarks/qmma_dq_gpu.sh OUT_DIR}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/tests:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
# the three choices' own tests and the one-zero-row build's (about 2 minutes: each builds its kernel variants with NVRTC); ALL_TESTS=1 also runs
# the kernel's default builds' 160 tests (2 more minutes)
tests="dq or persistent or split_major or one_zero_row"
[ "${ALL_TESTS:-0}" = 1 ] && tests="$tests or not ($tests)"
timeout -s INT 200 python3 -m pytest -q -rf -p no:cacheprovider -m gpu -k "$tests" tests/test_qmma_gpu.py > "$OUT/qmma_tests.log" 2>&1
echo "qmma tests rc=$?"; tail -3 "$OUT/qmma_tests.log"
if [ "${TABLE:-1}" = 1 ]; then  # TABLE=0: the decode steps only (2 minutes less)
    timeout 150 python3 benchmarks/qmma_gpu.py --table --ms 16,32,48,64 --budget-s 120 --out "$OUT/per_layer_dq.json" \
        > "$OUT/per_layer_dq.log" 2>&1
    echo "per layer rc=$?"; tail -12 "$OUT/per_layer_dq.log"
fi
source benchmarks/variant.sh
route="ROUTE_MAX_M = 16=>ROUTE_MAX_M = 64"
split_major="SPLIT_MAJOR_SUM = False=>SPLIT_MAJOR_SUM = True"
persistent="PERSISTENT = False=>PERSISTENT = True"
qmma=ops/matmul/qmma.py
routed=$(variant $qmma "$route") || exit 1
both=$(variant $qmma "$route" "$split_major") || exit 1
persist=$(variant $qmma "$route" "$split_major" "$persistent") || exit 1
# dq / tldot at 32-64 rows times the DQ build; both / dq at 4-16 rows the split-major sum (DQ serves no row count
# <= 16); persist / both at 4-16 rows the persistent grid
timeout 400 python3 benchmarks/ab_trees_gpu.py --tree tldot=src --tree dq="$routed" --tree both="$both" --tree persist="$persist" \
    --quants gptq4,q4_k --batch 4,16,32,64 --context 512 --rounds 2 --steps 20 --out "$OUT/ab" 2>&1 | tee "$OUT/ab.log" | tail -10
# the verdict by benchmarks/qmma_decide.py's rule; APPLY=1 also sets the winners in src/ (for a bench after it)
python3 benchmarks/qmma_decide.py "$OUT" $([ "${APPLY:-0}" = 1 ] && echo --apply) | tee "$OUT/decide.log"
