#!/usr/bin/env bash
# One GPU run of what a CPU cannot check: the kernels and the graphed generator on CUDA (the
# GPU-marked tests, and the interpreter-tested kernel tests run on the GPU), the GPTQ GEMV with its
# weights read from HBM, and lowgear beside ExLlamaV2 0.3.2 on an 8B-shape GPTQ folder (needs
# exllamav2 importable) with a kernel profile of lowgear's step. Each part has a time limit so the
# whole run fits one device slot; what finished is in OUT_DIR either way. `lowgear bench` is
# benchmarks/run_gpu_bench.sh.
#
# ExLlamaV2 builds its CUDA extension on first import (about 2.5 minutes): that build runs on the
# CPU cores while the GPU tests run. The built module is left as OUT_DIR/exllamav2_ext.so.xz; a later
# run given EXLLAMAV2_EXT=that file (or its unpacked .so) imports it instead of building again.
#
#   bash benchmarks/run_gpu_checks.sh OUT_DIR
set -uo pipefail
OUT="${1:?usage: bash benchmarks/run_gpu_checks.sh OUT_DIR}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/tests:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
ext_dir=/tmp/exllamav2_prebuilt
mkdir -p "$ext_dir"
export PYTHONPATH="$PYTHONPATH:$ext_dir"
if [ -n "${EXLLAMAV2_EXT:-}" ] && [ -f "$EXLLAMAV2_EXT" ]; then
  case "$EXLLAMAV2_EXT" in
    *.xz) xz -dc "$EXLLAMAV2_EXT" > "$ext_dir/exllamav2_ext.so" ;;
    *) cp "$EXLLAMAV2_EXT" "$ext_dir/exllamav2_ext.so" ;;
  esac
fi
build_pid=
# (the extension links against torch's libraries: it imports only after torch)
if python3 -c "import exllamav2" 2>/dev/null && ! python3 -c "import torch, exllamav2_ext" 2>/dev/null; then
  ( MAX_JOBS="${MAX_JOBS:-$(nproc)}" python3 -c "import exllamav2.ext" > "$OUT/exllamav2_build.log" 2>&1
    so=$(find "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}" -name 'exllamav2_ext*.so' | head -1)
    if [ -n "$so" ]; then xz -T0 -3 -c "$so" > "$OUT/exllamav2_ext.so.xz"; fi ) &
  build_pid=$!
  echo "building ExLlamaV2's extension in the background (pid $build_pid)"
fi
timeout "${T_TESTS:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider -rf \
    tests/test_quant_kernels_gptq_mma.py tests/test_quant_kernels_exl2.py tests/test_quant_kernels_f16x2.py \
    tests/test_gpu_end_to_end.py tests/test_generator_graphs_gpu.py tests/test_attention_triton_gpu.py > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -6 "$OUT/gpu_tests.log"
# tests that run on whatever device is there (the kernels on CUDA here, in the interpreter in CI)
timeout "${T_TESTS2:-120}" python3 -m pytest -q -p no:cacheprovider -rf tests/test_quant_kernels_splitk.py \
    tests/test_norm_rope_kernels.py tests/test_model_fused_step.py tests/test_quant_repack.py \
    tests/test_quant_kernels_gptq.py tests/test_quant_kernels_float_gemv.py > "$OUT/cuda_tests.log" 2>&1
echo "cuda tests rc=$?"; tail -4 "$OUT/cuda_tests.log"
timeout "${T_GEMV:-60}" python3 benchmarks/experiments/gemv_cold_gpu.py --quick --out "$OUT/gemv_cold.json" > "$OUT/gemv_cold.log" 2>&1
echo "gemv rc=$?"; cat "$OUT/gemv_cold.log"
if [ -n "$build_pid" ]; then wait "$build_pid"; echo "ExLlamaV2 extension build: $(tail -1 "$OUT/exllamav2_build.log")"; fi
timeout "${T_SPEED:-150}" python3 benchmarks/exllamav2_vs_lowgear_gpu.py --out "$OUT" --steps 16 --profile \
    > "$OUT/exllamav2_vs_lowgear.log" 2>&1
echo "exllamav2 vs lowgear rc=$?"; grep -v "^\s*$" "$OUT/exllamav2_vs_lowgear.log" | grep -v "UserWarning\|_warn_once" | tail -30
