#!/usr/bin/env bash
# One GPU run of what a CPU cannot check: the GPU-marked tests of the kernels and the graphed
# generator, lowgear beside ExLlamaV2 0.3.2 on an 8B-shape GPTQ folder (needs exllamav2 importable),
# and `lowgear bench`'s graphed decode on the 8B fp16 shape. Each part has a time limit so the whole
# run fits one device slot; what finished is in OUT_DIR either way.
#
#   bash benchmarks/run_gpu_checks.sh OUT_DIR
set -uo pipefail
OUT="${1:?usage: bash benchmarks/run_gpu_checks.sh OUT_DIR}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
timeout "${T_TESTS:-110}" python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_quant_kernels_gptq.py tests/test_quant_kernels_gptq_mma.py tests/test_quant_kernels_exl2.py \
    tests/test_gpu_end_to_end.py tests/test_generator_graphs_gpu.py tests/test_attention_triton_gpu.py \
    > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -25 "$OUT/gpu_tests.log"
# tests that run on whatever device is there (the kernels on CUDA here, in the interpreter in CI)
timeout "${T_TESTS2:-90}" python3 -m pytest -q -p no:cacheprovider tests/test_quant_kernels_splitk.py \
    tests/test_norm_rope_kernels.py tests/test_model_fused_step.py > "$OUT/cuda_tests.log" 2>&1
echo "cuda tests rc=$?"; tail -8 "$OUT/cuda_tests.log"
timeout "${T_GEMV:-100}" python3 benchmarks/gptq_gemv_gpu.py --quick --ms 1,8 --out "$OUT/gemv.json" \
    > "$OUT/gemv.log" 2>&1
echo "gemv rc=$?"; tail -20 "$OUT/gemv.log"
timeout "${T_SPEED:-150}" python3 benchmarks/exllamav2_vs_lowgear_gpu.py --out "$OUT" --steps 16 --profile \
    > "$OUT/exllamav2_vs_lowgear.log" 2>&1
echo "exllamav2 vs lowgear rc=$?"; grep -v "^\s*$" "$OUT/exllamav2_vs_lowgear.log" | tail -60
timeout "${T_BENCH:-45}" python3 -m lowgear.cli bench --preset llama3-8b --quant float --dtype float16 \
    --batch 1,64 --context 512,1024 --prefill 512 --rungs triton --no-peer --warmup 2 --iters 8 --out "$OUT" \
    > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; tail -15 "$OUT/bench.log"
