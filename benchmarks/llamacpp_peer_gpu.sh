#!/usr/bin/env bash
# lowgear beside llama.cpp on the same GGUF files, on one GPU, in one run (the GGUF table of docs/performance.md).
#
#   bash benchmarks/llamacpp_peer_gpu.sh OUT_DIR [TYPES] [BATCHES]
#       TYPES   llama-quantize types, comma list (default F16,Q4_0,Q4_K_M,Q5_K_M,Q6_K,Q8_0)
#       BATCHES decode batch sizes (default 1,16,64); context 512
#
# 1. builds llama.cpp's tools (llama-quantize, llama-batched-bench) with CUDA for this GPU from
#    .peer/llama-src.tar.gz (llama.cpp's source from PyPI's llama-cpp-python sdist, vendor/llama.cpp,
#    without models/ docs/ media/ gguf-py/ benches/ tests/ and the non-CUDA ggml backends: ~9 MB),
#    once, into .peer/llama.cpp/build (kept while the machine is). Make the tarball where PyPI is
#    reachable (.peer/ is git-ignored; carry it to a machine without a network):
#      pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/l && tar -xzf /tmp/l/*.tar.gz -C /tmp/l
#      cd /tmp/l/llama_cpp_python-0.3.36/vendor && tar -czf $REPO/.peer/llama-src.tar.gz \
#        $(for d in models docs media gguf-py benches build tests .git; do echo --exclude=llama.cpp/$d; done) \
#        $(for b in blas cann et hexagon hip metal musa opencl openvino rpc sycl virtgpu vulkan webgpu zdnn zendnn; \
#          do echo --exclude=llama.cpp/ggml/src/ggml-$b; done) llama.cpp
# 2. writes a random Llama-3-8B-shape model as F16 GGUF (lowgear's synthetic writer) and quantizes it
#    with llama.cpp's own llama-quantize to each type (so Q4_K_M holds llama.cpp's real Q6_K / Q4_K mix);
# 3. `lowgear bench --model FILES --llama-cpp BIN` times both engines on each file: graphed decode at
#    each batch size, context 512, and a 512-token prefill; OUT_DIR/<file>/bench.json holds every figure
#    and ratio, one folder per file.
# PHASE=prepare stops after step 2 (to build and quantize while the GPU does other work).
set -euo pipefail
OUT="${1:?usage: bash benchmarks/llamacpp_peer_gpu.sh OUT_DIR [TYPES] [BATCHES]}"
TYPES="${2:-F16,Q4_0,Q4_K_M,Q5_K_M,Q6_K,Q8_0}"
BATCHES="${3:-1,16,64}"
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" .peer/models
LC=.peer/llama.cpp
BIN="$LC/build/bin"

F16=.peer/models/llama3-8b-f16.gguf
# the F16 file is written beside the build (one CPU core against ninja's many: ~2 minutes saved)
WRITER=""
if [ ! -s "$F16" ]; then
    echo "== writing $F16 $(date +%T)"
    ( "$PY" - "$F16.part" <<'PY'
import sys
from lowgear.bench.models import PRESETS
from lowgear.bench.synthetic import write_gguf
s = PRESETS["llama3-8b"]
write_gguf(sys.argv[1], arch="llama", hidden_size=s.hidden_size, num_layers=s.num_layers, num_heads=s.num_heads,
           num_kv_heads=s.num_kv_heads, intermediate_size=s.intermediate_size, vocab_size=s.vocab_size,
           rope_theta=s.rope_theta, qtype="F16", seed=8, std=0.02, progress=False)
PY
    mv "$F16.part" "$F16" ) > "$OUT/write-f16.log" 2>&1 &
    WRITER=$!
fi
if [ ! -x "$BIN/llama-batched-bench" ] || [ ! -x "$BIN/llama-quantize" ]; then
    echo "== building llama.cpp (CUDA) $(date +%T)"
    [ -s .peer/llama-src.tar.gz ] || { echo "no .peer/llama-src.tar.gz: see the top of this script" >&2; exit 2; }
    [ -d "$LC" ] || tar -xzf .peer/llama-src.tar.gz -C .peer
    arch="$("$PY" -c 'import torch; p = torch.cuda.get_device_capability(); print(f"{p[0]}{p[1]}")')"
    cmake -S "$LC" -B "$LC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES="$arch" -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=ON > "$OUT/llamacpp-cmake.log" 2>&1
    ninja -C "$LC/build" llama-quantize llama-batched-bench > "$OUT/llamacpp-build.log" 2>&1
    echo "== built $(date +%T)"
fi
git -C "$LC" describe --tags 2>/dev/null || grep -m1 -o 'LLAMA_BUILD_NUMBER [0-9]*' "$LC/build/CMakeCache.txt" 2>/dev/null || true

[ -z "$WRITER" ] || wait "$WRITER" || { echo "writing $F16 failed:"; tail "$OUT/write-f16.log"; exit 1; }
FILES=""
for t in ${TYPES//,/ }; do
    f=.peer/models/llama3-8b-$(echo "$t" | tr 'A-Z' 'a-z').gguf
    if [ "$t" = F16 ]; then f="$F16"
    elif [ ! -s "$f" ]; then
        echo "== llama-quantize $t $(date +%T)"
        # into .part, then renamed: a run cut short mid-file leaves no half file that a rerun would take as done
        "$BIN/llama-quantize" "$F16" "$f.part" "$t" "$(nproc)" > "$OUT/quantize-$t.log" 2>&1 && mv "$f.part" "$f"
        grep -E "^llama_model_quantize_impl: (model|quant) size" "$OUT/quantize-$t.log" || true
    fi
    FILES="$FILES${FILES:+,}$f"
done

[ "${PHASE:-all}" = prepare ] && exit 0  # PHASE=prepare: build and write the files only
# one bench per file, each a whole table (both engines): a run cut short keeps the files it finished
for f in ${FILES//,/ }; do
    name=$(basename "$f" .gguf)
    echo "== bench $name $(date +%T)"
    "$PY" -m lowgear.cli.main bench --model "$f" --llama-cpp "$BIN" --rungs triton --no-peer \
        --batch "$BATCHES" --context 512 --prefill 512 --warmup 2 --iters 10 --out "$OUT/$name" 2>&1 \
        | grep -v "it/s\]\|layer/s\]" | tee "$OUT/$name.log" | grep -E "lowgear|llama.cpp|skipped|Error" || true
done
echo; "$PY" benchmarks/llamacpp_table.py "$OUT" --json "$OUT/table.json"
