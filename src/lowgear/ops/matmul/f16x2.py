"""A 4-bit word times eight fp16 activations in packed half2 arithmetic (inline PTX), for the GEMV.

The GPTQ GEMV's fp32 unpack (`gptq._code_minus_zero`) costs three instructions a code (mask-or,
subtract, FMA) plus a load and a convert per activation, which makes the batch-1 GEMV
issue-bound (docs/decisions/005-gptq-gemv-launch.md). Here one 32-bit word of eight codes c0..c7 (bits 4j..4j+3) becomes four
half2 of (code - zero) with the exponent trick in fp16, and meets the activations as half2 pairs:

    p = (w & 0x000F000F) | 0x64006400   ->  half2(1024 + c0, 1024 + c4)      (0x6400 is 1024.0)
    p = (w & 0x00F000F0) | 0x64006400   ->  half2(1024 + 16 c1, 1024 + 16 c5)
    (and the same on w >> 8 for c2, c6 and c3, c7)
    p - (1024 + z)  or  p * 1/16 - (64 + z)   ->  c - z, exact (small integers, one rounding)

then four packed FMAs against (x0, x4), (x1, x5), (x2, x6), (x3, x7) sum the word's eight products
as two fp16 lanes, added in fp32: about two instructions a code. ExLlama's and Marlin's kernels use
the same fp16 trick. The cost in accuracy is the fp16 rounding of four-term partial sums (a few
units of 2**-11 relative to the word's partial sum, which the caller adds in fp32 and scales).

Activations come in as 32-bit words holding two fp16 each (x0x1, x2x3, x4x5, x6x7 of a row-group);
`pairs` regroups them with byte permutes, once per row-group rather than per column. Every
instruction used (lop3, prmt, f16x2 add/mul/fma) exists from sm_53 on, so T4 and V100 run it too.
The interpreter cannot run PTX: callers keep their fp32 path for it (and for bf16 activations), and
`dot8_reference` restates the same steps in numpy for the CPU tests.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

_PAIRS_ASM = tl.constexpr("""
{
.reg .b32 scale;
mov.b32 scale, 0x24002400;
prmt.b32 $0, $4, $6, 0x5410;
prmt.b32 $1, $4, $6, 0x7632;
prmt.b32 $2, $5, $7, 0x5410;
prmt.b32 $3, $5, $7, 0x7632;
mul.rn.f16x2 $0, $0, scale;
mul.rn.f16x2 $1, $1, scale;
mul.rn.f16x2 $2, $2, scale;
mul.rn.f16x2 $3, $3, scale;
}
""")
# `pairs` scales x by 2**-6 (exact for normal fp16 values), so a lane's four products of (code - zero),
# at most 16 in magnitude, times x stay below 65504 for every finite fp16 x: without it activations
# past ~1000 (LLMs' "massive activations" reach thousands) would overflow the fp16 sums. The caller
# multiplies the fp32 result by X_SCALE.
X_SCALE = tl.constexpr(64.0)

_DOT8_ASM = tl.constexpr("""
{
.reg .b32 p0, p1, p2, p3, w2, acc, sixteenth;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 sixteenth, 0x2C002C00;
lop3.b32 p0, $1, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 p1, $1, 0x00F000F0, 0x64006400, 0xEA;
shr.b32 w2, $1, 8;
lop3.b32 p2, w2, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 p3, w2, 0x00F000F0, 0x64006400, 0xEA;
sub.f16x2 p0, p0, $6;
fma.rn.f16x2 p1, p1, sixteenth, $7;
sub.f16x2 p2, p2, $6;
fma.rn.f16x2 p3, p3, sixteenth, $7;
mul.f16x2 acc, p0, $2;
fma.rn.f16x2 acc, p1, $3, acc;
fma.rn.f16x2 acc, p2, $4, acc;
fma.rn.f16x2 acc, p3, $5, acc;
mov.b32 {lo, hi}, acc;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}
""")


@triton.jit
def pairs(xw0, xw1, xw2, xw3):
    """Words (x0|x1), (x2|x3), (x4|x5), (x6|x7) -> half2 pairs (x0|x4), (x1|x5), (x2|x6), (x3|x7),
    each value times 2**-6 (see X_SCALE)."""
    return tl.inline_asm_elementwise(_PAIRS_ASM, "=r,=r,=r,=r,r,r,r,r", [xw0, xw1, xw2, xw3],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def splat(v):
    """fp32 values -> int32 words holding the value as fp16 in both halves (a half2 constant)."""
    h = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h | (h << 16)


@triton.jit
def dot8(w, x04, x15, x26, x37, z1024, z64_neg):
    """sum over j of (code j of w - z) * x_j as fp32 for `pairs`' x (so X_SCALE times too small);
    z1024 = splat(1024 + z), z64_neg = splat(-(64 + z))."""
    return tl.inline_asm_elementwise(_DOT8_ASM, "=f,r,r,r,r,r,r,r", [w, x04, x15, x26, x37, z1024, z64_neg],
                                     dtype=tl.float32, is_pure=True, pack=1)


def dot8_reference(words: np.ndarray, x: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """`pairs` then `dot8` (times X_SCALE) in numpy, step by step: words uint32 [...], x float16 [..., 8],
    zero [...] -> float32 [...].

    Each f16x2 operation is done per lane in float16 (numpy rounds every op, as the PTX does; the
    FMAs are done in float32 and rounded once, as fma.rn is).
    """
    w = words.astype(np.uint32)
    z = zero.astype(np.float32)

    def half(bits):  # uint32 -> the two fp16 lanes (low, high) as float32
        lo = (bits & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32)
        hi = (bits >> 16).astype(np.uint16).view(np.float16).astype(np.float32)
        return lo, hi

    def f16(v):
        return v.astype(np.float16).astype(np.float32)

    lanes = []
    x = (x.astype(np.float32) * np.float32(2.0**-6)).astype(np.float16)  # `pairs`' scaling
    for src in (w, w >> np.uint32(8)):
        lo_codes = half((src & np.uint32(0x000F000F)) | np.uint32(0x64006400))
        hi_codes = half((src & np.uint32(0x00F000F0)) | np.uint32(0x64006400))
        lanes.append([f16(v - f16(1024 + z)) for v in lo_codes])
        lanes.append([f16(v * np.float32(1 / 16) - f16(64 + z)) for v in hi_codes])
    # lanes[i] = (c_i - z, c_{i+4} - z) for i = 0, 1, 2, 3
    xf = x.astype(np.float32)
    acc = [f16(lanes[0][0] * xf[..., 0]), f16(lanes[0][1] * xf[..., 4])]
    for i in (1, 2, 3):
        acc = [f16(lanes[i][0] * xf[..., i] + acc[0]), f16(lanes[i][1] * xf[..., i + 4] + acc[1])]
    return ((acc[0] + acc[1]) * np.float32(64.0)).astype(np.float32)
