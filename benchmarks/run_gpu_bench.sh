#!/usr/bin/env bash
# The GPU run of `lowgear bench` (an H100, or any CUDA GPU with >= 60 GB): Llama-3-8B shapes in float16
# and Q4_0-packed, decode at batch 1/8/32/64 and context 512/4096, a 2048-token prefill and time to
# first token, on every attention rung that works there plus the forced T4/V100 rung, with transformers
# (sdpa and eager, the fastest counts) on the same shapes as the peer. About 5-7 minutes on an H100.
#
#   bash benchmarks/run_gpu_bench.sh OUT_DIR        # writes OUT_DIR/bench.json, bench.png, bench.log
#
# Weights are random tensors made on the GPU (no model file, no download). lowgear needs its
# dependencies importable (torch, numpy, gguf, tokenizers, tqdm; transformers for the peer,
# matplotlib for the PNG): a folder .benchsite/ at the repository root, if present, is added to the path
# for machines where they cannot be installed. See benchmarks/README.md for reading the output.
set -euo pipefail
OUT="${1:?usage: bash benchmarks/run_gpu_bench.sh OUT_DIR}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .benchsite ]; then export PYTHONPATH="$PYTHONPATH:$PWD/.benchsite"; fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt" || true
# 470 s: the whole run stays inside an 8-minute slot even if a rung crawls; what finished is still in the log.
timeout 470 "${PYTHON:-python3}" -m lowgear.cli bench \
    --preset llama3-8b --quant float,q4_0 --dtype float16 \
    --batch 1,8,32,64 --context 512,4096 --prefill 2048 \
    --rungs all --peer-attn sdpa,eager \
    --warmup 3 --iters 10 --out "$OUT" 2>&1 | tee "$OUT/bench.log"
