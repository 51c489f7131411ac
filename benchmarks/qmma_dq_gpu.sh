#!/usr/bin/env bash
# The GPU run two written-but-untimed choices of qmma.cu wait for (decision 026): the DQ build (17-64 rows),
# which gptq_matmul routes to once timed, and the split-major split-K sum for 4-16 rows (SPLIT_MAJOR_SUM).
# The kernel's tests against float64, the DQ build's per-layer time beside the tl.dot kernel, and whole decode
# steps of three trees interleaved in one run (same greedy tokens checked): this one, a copy with
# qmma.ROUTE_MAX_M = 64, and a copy with that and SPLIT_MAJOR_SUM = True. About 7 minutes on an H100
# (TABLE=0: 5).
#
#   bash benchmarks/qmma_dq_gpu.sh OUT_DIR
set -uo pipefail
OUT="${1:?usage: bash benchmarks/qmma_dq_gpu.sh OUT_DIR}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/tests:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
timeout -s INT 170 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_qmma_gpu.py > "$OUT/qmma_tests.log" 2>&1
echo "qmma tests rc=$?"; tail -3 "$OUT/qmma_tests.log"
if [ "${TABLE:-1}" = 1 ]; then  # TABLE=0: the decode steps only (2 minutes less)
    timeout 150 python3 benchmarks/qmma_gpu.py --table --ms 16,32,48,64 --budget-s 120 --out "$OUT/per_layer_dq.json" \
        > "$OUT/per_layer_dq.log" 2>&1
    echo "per layer rc=$?"; tail -12 "$OUT/per_layer_dq.log"
fi
variant() {  # a copy of src with one line of qmma.py changed
    local dir; dir=$(mktemp -d); cp -r src "$dir/src"
    sed -i "s/^$1\$/$2/" "$dir/src/lowgear/ops/matmul/qmma.py"
    grep -q "^$2\$" "$dir/src/lowgear/ops/matmul/qmma.py" || { echo "qmma.py has no line '$1'" >&2; return 1; }
    echo "$dir/src"
}
routed=$(variant "ROUTE_MAX_M = 16" "ROUTE_MAX_M = 64") || exit 1
both=$(variant "ROUTE_MAX_M = 16" "ROUTE_MAX_M = 64") || exit 1
sed -i "s/^SPLIT_MAJOR_SUM = False\$/SPLIT_MAJOR_SUM = True/" "$both/lowgear/ops/matmul/qmma.py"
grep -q "^SPLIT_MAJOR_SUM = True$" "$both/lowgear/ops/matmul/qmma.py" || { echo "no SPLIT_MAJOR_SUM line" >&2; exit 1; }
# dq / tldot at 32-64 rows times the DQ build; both / dq at 16 rows the split-major sum (DQ serves no row count <= 16)
timeout 330 python3 benchmarks/ab_trees_gpu.py --tree tldot=src --tree dq="$routed" --tree both="$both" \
    --quants gptq4,q4_k --batch 16,32,64 --context 512 --rounds 2 --steps 20 --out "$OUT/ab" 2>&1 | tee "$OUT/ab.log" | tail -10
