#!/usr/bin/env bash
# 5/6-bit GGUF codes held as 6-bit codes (repack.SIX_BIT) against 8-bit ones, on real files, one GPU, one run:
# `lowgear bench` (graphed decode, triton rung, context 512) on each file with this tree and with a copy whose
# repack.py has SIX_BIT = True, in turns (8-bit, 6-bit; ROUNDS=2, the default, twice over, so drift shows as a spread). The kernels'
# GPU tests against float64 run first (tests/test_quant_repack.py: 6-bit layers through the GEMV, the dequantizer
# and the tl.dot kernel). why: docs/decisions/027-six-bit-codes.md
#
#   bash benchmarks/six_bit_gpu.sh OUT_DIR MODEL[,MODEL...] [BATCHES]
#       MODEL: a .gguf file, or PRESET:QUANT for a synthetic model (llama3-8b:q6_k)
set -uo pipefail
OUT="${1:?usage: bash benchmarks/six_bit_gpu.sh OUT_DIR MODELS [BATCHES]}"
FILES="${2:?usage: bash benchmarks/six_bit_gpu.sh OUT_DIR MODELS [BATCHES]}"
BATCHES="${3:-1,16,64}"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
source benchmarks/variant.sh
six=$(variant ops/matmul/repack.py "SIX_BIT = False=>SIX_BIT = True") || exit 1
if [ "${TESTS:-1}" = 1 ]; then  # TESTS=0: the benches only
    PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" timeout -s INT 120 "$PY" -m pytest -q -rf -p no:cacheprovider \
        tests/test_quant_repack.py > "$OUT/repack_tests.log" 2>&1
    echo "repack tests rc=$?"; tail -2 "$OUT/repack_tests.log"
fi
for round in $(seq "${ROUNDS:-2}"); do
    for f in ${FILES//,/ }; do
        for tree in eight six; do
            src="$PWD/src"; [ "$tree" = six ] && src="$six"
            if [[ "$f" == *.gguf ]]; then model=(--model "$f"); name=$(basename "$f" .gguf)
            else model=(--preset "${f%%:*}" --quant "${f##*:}"); name="${f/:/-}"; fi
            name="$name-$tree-$round"
            echo "== $name $(date +%T)"
            PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m lowgear.cli.main bench "${model[@]}" --rungs triton --no-peer \
                --batch "$BATCHES" --context 512 --prefill 512 --warmup 2 --iters 10 --out "$OUT/$name" 2>&1 \
                | grep -v "it/s\]\|layer/s\]" > "$OUT/$name.log"
            grep -E "lowgear|Error" "$OUT/$name.log" | head -8
        done
    done
done
