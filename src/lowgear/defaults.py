"""Every default and name list lowgear has, once. `Config` reads these; so does each module that needs
one when no Config is at hand. This module imports nothing, so any package may read it."""

# The attention ladder, best first: `select_backend` walks it, `--attn-backend` takes these names.
ATTENTION_LADDER = ("flash_attn", "xformers", "sdpa", "triton", "eager")
DTYPE_NAMES = ("float16", "bfloat16", "float32")

# KV cache pages, in tokens (a multiple of 256 is what flash-attn's paged kernel takes).
PAGE_SIZE = 256
# Jobs decoded together in one step by a DynamicGenerator and by `lowgear serve`.
MAX_BATCH_SIZE = 16
# Prompt tokens run in one step (longer prompts are prefilled in chunks of this size).
MAX_INPUT_LEN = 2048
# GPU memory left free beyond the placement plan, per device.
RESERVE_MEMORY_MB = 512
# `lowgear serve`'s cache when no size is given: the model's context, at most this many tokens.
SERVER_CACHE_TOKENS = 8192
# Where sm_90+ decode kernels let the next kernel in (ops/pdl.py); auto: wait at one token row, loop above.
PDL_RELEASE_MODES = ("auto", "loop", "wait", "start")
PDL_RELEASE = "auto"
# How packed weights live on a CPU (platform/placement.cpu_weights decides, doctor says): "auto" holds 4-bit
# GGUF layers for torch's int4 kernel where it runs and unpacks the other packed linears once at load
# into float weights when those fit in 1/CPU_UNPACK_RAM_SHARE of the RAM left after the cache, else keeps
# them packed; "int4" / "unpacked" / "packed" force one (docs/decisions/022-cpu-int4-weights.md).
CPU_WEIGHTS_MODES = ("auto", "int4", "unpacked", "packed")
CPU_WEIGHTS = "auto"
CPU_UNPACK_RAM_SHARE = 2
# max_seq_len "auto" on a CPU-only plan: a cache of at most 1/CPU_AUTO_RAM_SHARE of available RAM.
CPU_AUTO_RAM_SHARE = 4
# Speculative decoding (engine/speculative.py): proposed tokens checked per step, and the longest
# n-gram the prompt-lookup proposer matches (it tries shorter ones down to 1).
SPECULATE_MODES = ("ngram", "draft")
NUM_DRAFT_TOKENS = 4
NGRAM_MAX = 3
# KV cache storage (--kv-cache-dtype): the model dtype, or 8 / 4 bits with a float32 scale per token and head.
# why (these and the two above): docs/decisions/020-speculative-and-8-bit-kv.md
KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3", "int4")
# The frame each quantized storage stores head vectors in (ops/kv_write.py): "rot" a Hadamard rotation of
# the head, "k" / "v" keys / values less a fixed per-channel mean; "none" as they are. Calibrated on
# KV_CALIBRATION_TOKENS fixed token ids when the cache is allocated (cache/kv.py).
# why: docs/decisions/025-kv-quality-rotated-shifted-kv.md
KV_SCHEMES = {"int8": "rot+k", "fp8_e4m3": "rot+k", "int4": "rot+k"}
KV_CALIBRATION_TOKENS = 512
