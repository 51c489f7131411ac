"""What the paged attention kernels share: the score soft-cap, the decoding of quantized KV codes and the
operands a launch takes for a float or quantized (ops/kv_write.QuantizedKV) cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
# "No window" is a window longer than any context, so the kernels need no branch for it.
NO_WINDOW = 1 << 30


@triton.jit
def softcapped(s, cap_log2):
    """Scores s in the log2 domain (score * log2(e)) soft-capped: cap * tanh(score / cap), times log2(e),
    for cap_log2 = cap * log2(e). tanh(x) = 1 - 2 / (1 + e^(2x)): exact at both ends (e^(2x) overflowing
    to inf gives 1, underflowing to 0 gives -1), with no tanh instruction the interpreter lacks;
    e^(2x) = 2^(2 log2(e) x), and x = s / cap_log2."""
    return cap_log2 * (1.0 - 2.0 / (1.0 + tl.exp2(2.8853900817779268 * s / cap_log2)))


@triton.jit
def dequantize(x, shift, QUANT: tl.constexpr):
    """Codes as float32 (before their scale): QUANT 1 int8; 2 float8 e4m3 held as its byte; 3 int4, the
    nibble at bit `shift` of its byte, offset by 8. Shared by the decode and prefill kernels."""
    if QUANT == 1:
        return x.to(tl.float32)
    if QUANT == 3:
        return ((x.to(tl.int32) >> shift) & 0xF).to(tl.float32) - 8.0
    # e4m3 (sign, 4 exponent bits biased by 7, 3 mantissa bits) moved into float16's fields (biased by
    # 15, 10 mantissa bits) reads as the value times 2^-8, subnormals included: normal (1 + m/8) *
    # 2^(e-15) and subnormal m/8 * 2^-14 against e4m3's (1 + m/8) * 2^(e-7) and m/8 * 2^-6. Integer
    # ops and one conversion, which every GPU (and the interpreter) has.
    b = x.to(tl.int32)
    bits = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0


# QuantizedKV.kind -> the kernels' QUANT constexpr (0: a float cache)
QUANT_CODES = {"int8": 1, "fp8_e4m3": 2, "int4": 3}


def kv_operands(k_cache, v_cache):
    """(QUANT, k, v, k_scale, v_scale, scale strides) a kernel launch takes for caches that are tensors
    or ops/kv_write.QuantizedKV: the codes as int8 (int8) or bytes (e4m3 and int4, decoded in the
    kernel) and the float32 scales [pages, page_size, kv_heads, 1] with their page and token strides
    (their head stride is 1). A float cache passes itself for the unread scales, and strides 0."""
    from ..kv_write import QuantizedKV

    if not isinstance(k_cache, QuantizedKV):
        return 0, k_cache, v_cache, k_cache, v_cache, (0, 0)
    quant = QUANT_CODES[k_cache.kind]
    storage = torch.int8 if quant == 1 else torch.uint8
    k_scale, v_scale = k_cache.scale, v_cache.scale
    assert k_scale.stride() == v_scale.stride() and k_scale.stride(2) == 1, (k_scale.stride(), v_scale.stride())
    return (quant, k_cache.data.view(storage), v_cache.data.view(storage), k_scale, v_scale,
            (k_scale.stride(0), k_scale.stride(1)))
