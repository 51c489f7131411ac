#!/usr/bin/env bash
# The GPU run of `lowgear bench` (an H100, or any CUDA GPU with >= 60 GB): Llama-3-8B shapes in float16,
# Q4_0-packed and GPTQ 4-bit, decode at batch 1/16/64 and context 512/1024, a 2048-token prefill and
# time to first token, on the triton rung (graphed decode) and the forced T4/V100 rung, with
# transformers (sdpa and eager, the fastest counts) on the same shapes as the peer. About 6-8 minutes
# on an H100; `--rungs all --batch 1,8,32,64 --context 512,4096` is the longer sweep.
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
# 540 s: the whole run stays inside a 10-minute slot even if a rung crawls; what finished is still in the log.
# Rungs: triton (what a default run uses for decode steps, graphed) and t4-v100 (the no-flash-attn
# fp16 path a T4 or V100 takes); transformers (sdpa and eager) is the peer, float16.
timeout 540 "${PYTHON:-python3}" -m lowgear.cli.main bench \
    --preset llama3-8b --quant float,q4_0,gptq4 --dtype float16 \
    --batch 1,16,64 --context 512,1024 --prefill 2048 \
    --rungs triton,t4-v100 --peer-attn sdpa,eager \
    --warmup 2 --iters 8 --out "$OUT" 2>&1 | tee "$OUT/bench.log"
