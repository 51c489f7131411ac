#!/usr/bin/env bash
# The GPU run the DQ build (qmma.cu, 17-64 rows) waits for before gptq_matmul routes to it (decision 026):
# its tests against float64, its per-layer time beside the tl.dot kernel, and whole decode steps of this tree
# against the same tree with qmma.ROUTE_MAX_M = 64 (interleaved, same greedy tokens checked). About 6 minutes
# on an H100.
#
#   bash benchmarks/qmma_dq_gpu.sh OUT_DIR
set -uo pipefail
OUT="${1:?usage: bash benchmarks/qmma_dq_gpu.sh OUT_DIR}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/tests:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
timeout -s INT 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_qmma_gpu.py > "$OUT/qmma_tests.log" 2>&1
echo "qmma tests rc=$?"; tail -3 "$OUT/qmma_tests.log"
timeout 150 python3 benchmarks/qmma_gpu.py --table --ms 16,32,48,64 --budget-s 120 --out "$OUT/per_layer_dq.json" \
    > "$OUT/per_layer_dq.log" 2>&1
echo "per layer rc=$?"; tail -12 "$OUT/per_layer_dq.log"
routed=$(mktemp -d)
cp -r src "$routed/src"
sed -i 's/^ROUTE_MAX_M = 16$/ROUTE_MAX_M = 64/' "$routed/src/lowgear/ops/matmul/qmma.py"
grep -q '^ROUTE_MAX_M = 64$' "$routed/src/lowgear/ops/matmul/qmma.py" || { echo "ROUTE_MAX_M not found"; exit 1; }
timeout 200 python3 benchmarks/ab_trees_gpu.py --tree tldot=src --tree dq="$routed/src" --quants gptq4,q4_k \
    --batch 16,32,64 --context 512 --rounds 2 --steps 20 --out "$OUT/ab" 2>&1 | tail -9
