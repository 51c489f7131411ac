"""Reading packed layouts inside Triton kernels: llama.cpp's GGUF blocks, and GPTQ's bit stream (`stream_code`).

Each helper takes the packed weight as two views of the same bytes (`w`: uint8, `wh`: float16) and
a tile of (row, block) coordinates, and returns the tile's small integer codes and scales in float32,
still factored (codes per element, scales per block or sub-block) so a GEMV can sum code * x over a
block before multiplying by the scale. The decode GEMVs (`gguf_gemv.py`, the experts' `moe_gemv.py`)
and the prefill tile dequantizer (`dequant_tile.py`) read the layouts only through these helpers, so
the facts about the formats live in one place:

    Q8_0  34 bytes / 32 elems: f16 d, int8 q[32];                value = d * q
    Q4_0  18 bytes / 32 elems: f16 d, 16 bytes of nibbles;       value = d * (q - 8)
    Q4_1  20 bytes / 32 elems: f16 d, f16 m, 16 bytes;           value = d * q + m
          (for both: byte i holds element i in its low nibble and element i + 16 in its high one)
    Q5_0  22 bytes / 32 elems: f16 d, qh[4], 16 bytes of nibbles;   value = d * (q - 16)
    Q5_1  24 bytes / 32 elems: f16 d, f16 m, qh[4], 16 bytes;       value = d * q + m
          (the low four bits as Q4_0's; bit j of the little-endian u32 qh is element j's fifth bit)
    Q4_K  144 bytes / 256 elems: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins for 8
          sub-blocks of 32, 128 bytes of nibbles; chunk c (32 bytes) holds sub-block 2c in its
          low nibbles and 2c + 1 in its high ones; value = d * sc * q - dmin * m
    Q5_K  176 bytes / 256 elems: Q4_K's d, dmin and scales, qh[32], then Q4_K's 128 bytes of nibbles;
          bit 2c of qh[l] is the fifth bit of element 64c + l, bit 2c + 1 that of 64c + 32 + l
    Q6_K  210 bytes / 256 elems: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16] (one
          per 16 elements), f16 d; value = d * scale * (q - 32)

Q2_K, Q3_K, IQ4_NL and IQ4_XS are read by their GEMVs in `gguf_gemv_low.py` (layouts in its
docstring). Those four and the Q5 types have no tile dequantizer, so their prefill bands come from
formats/dequant.py.

Row offsets are int64 (`row_base` = row * bytes_per_row): lm_head tensors pass 2**31 bytes.
"""

import triton
import triton.language as tl


@triton.jit
def stream_code(lo, hi, sh, BITS: tl.constexpr):
    """The code at bit `sh` of a GPTQ column's little-end bit stream, from its word lo and the next one, hi
    (uint32 tensors; hi is read only where 32 % BITS, the widths whose codes straddle words: 3 and 6) -> int32."""
    v = lo >> sh
    if 32 % BITS != 0:
        v = v | tl.where(sh > 32 - BITS, hi << ((32 - sh) & 31), 0)
    return (v & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def q8_0_tile(w, wh, row_base, blk, e):
    """row_base [BN], blk [NB], e [32] -> codes [BN, NB, 32], d [BN, NB]."""
    off = row_base[:, None, None] + (blk * 34 + 2)[None, :, None] + e[None, None, :]
    q = tl.load(w + off).to(tl.int8, bitcast=True).to(tl.float32)
    d = tl.load(wh + (row_base // 2)[:, None] + (blk * 17)[None, :]).to(tl.float32)
    return q, d


@triton.jit
def q4_0_tile(w, wh, row_base, blk, e):
    """row_base [BN], blk [NB], e [16] -> lo, hi codes [BN, NB, 16] (minus 8), d [BN, NB]."""
    off = row_base[:, None, None] + (blk * 18 + 2)[None, :, None] + e[None, None, :]
    q = tl.load(w + off)
    lo = (q & 15).to(tl.float32) - 8.0
    hi = (q >> 4).to(tl.float32) - 8.0
    d = tl.load(wh + (row_base // 2)[:, None] + (blk * 9)[None, :]).to(tl.float32)
    return lo, hi, d


@triton.jit
def q4_1_tile(w, wh, row_base, blk, e):
    """row_base [BN], blk [NB], e [16] -> lo, hi codes [BN, NB, 16], d, m [BN, NB]."""
    off = row_base[:, None, None] + (blk * 20 + 4)[None, :, None] + e[None, None, :]
    q = tl.load(w + off)
    lo = (q & 15).to(tl.float32)
    hi = (q >> 4).to(tl.float32)
    hoff = (row_base // 2)[:, None] + (blk * 10)[None, :]
    d = tl.load(wh + hoff).to(tl.float32)
    m = tl.load(wh + hoff + 1).to(tl.float32)
    return lo, hi, d, m


@triton.jit
def _q5_halves(w, base, e):
    """Low and high 16 five-bit codes [BN, NB, 16] of a Q5_0 / Q5_1 block: base [BN, NB, 1] is its qh
    byte; element e takes bit e % 8 of qh[e // 8] (e + 16: of qh[2 + e // 8])."""
    q = tl.load(w + base + 4 + e[None, None, :])
    bit = (e % 8)[None, None, :]
    h_lo = (tl.load(w + base + (e // 8)[None, None, :]) >> bit) & 1
    h_hi = (tl.load(w + base + (2 + e // 8)[None, None, :]) >> bit) & 1
    return (q & 15) | (h_lo << 4), (q >> 4) | (h_hi << 4)


@triton.jit
def q5_0_tile(w, wh, row_base, blk, e):
    """row_base [BN], blk [NB], e [16] -> lo, hi codes [BN, NB, 16] (minus 16), d [BN, NB]."""
    lo, hi = _q5_halves(w, row_base[:, None, None] + (blk * 22 + 2)[None, :, None], e)
    d = tl.load(wh + (row_base // 2)[:, None] + (blk * 11)[None, :]).to(tl.float32)
    return lo.to(tl.float32) - 16.0, hi.to(tl.float32) - 16.0, d


@triton.jit
def q5_1_tile(w, wh, row_base, blk, e):
    """row_base [BN], blk [NB], e [16] -> lo, hi codes [BN, NB, 16], d, m [BN, NB]."""
    lo, hi = _q5_halves(w, row_base[:, None, None] + (blk * 24 + 4)[None, :, None], e)
    hoff = (row_base // 2)[:, None] + (blk * 12)[None, :]
    d = tl.load(wh + hoff).to(tl.float32)
    m = tl.load(wh + hoff + 1).to(tl.float32)
    return lo.to(tl.float32), hi.to(tl.float32), d, m


@triton.jit
def _q4_k_scale_min(w, sbase, s):
    """6-bit scale and min of sub-block s (0..7) from the 12 scale bytes at sbase."""
    low = s < 4
    b1 = tl.load(w + sbase + tl.where(low, s, s + 4)[None, :])
    b2 = tl.load(w + sbase + tl.where(low, s + 4, s - 4)[None, :])
    b3 = tl.load(w + sbase + s[None, :])
    sc = tl.where(low[None, :], b1 & 63, (b1 & 15) | ((b2 >> 6) << 4))
    mn = tl.where(low[None, :], b2 & 63, (b1 >> 4) | ((b3 >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _k_tile(w, wh, row_base, blk, c, l, FIVE: tl.constexpr):
    """Q4_K (FIVE False) or Q5_K (FIVE True): see q4_k_tile."""
    bb: tl.constexpr = 176 if FIVE else 144
    base = row_base[:, None] + (blk * bb)[None, :]  # [BN, J]
    q = tl.load(w + base[:, :, None] + (bb - 128 + c * 32)[None, :, None] + l[None, None, :])
    lo = q & 15
    hi = q >> 4
    if FIVE:
        qh = tl.load(w + base[:, :, None] + 16 + l[None, None, :])
        lo = lo | (((qh >> (2 * c)[None, :, None]) & 1) << 4)
        hi = hi | (((qh >> (2 * c + 1)[None, :, None]) & 1) << 4)
    hbase = (row_base // 2)[:, None] + (blk * (bb // 2))[None, :]
    d = tl.load(wh + hbase).to(tl.float32)
    dmin = tl.load(wh + hbase + 1).to(tl.float32)
    sc_lo, mn_lo = _q4_k_scale_min(w, base + 4, 2 * c)
    sc_hi, mn_hi = _q4_k_scale_min(w, base + 4, 2 * c + 1)
    return lo.to(tl.float32), hi.to(tl.float32), d * sc_lo, d * sc_hi, dmin * mn_lo, dmin * mn_hi


@triton.jit
def q4_k_tile(w, wh, row_base, blk, c, l):
    """Chunks j of 64 elements: super-block blk[j], chunk c[j] (0..3); l = arange(32).

    -> lo, hi codes [BN, J, 32] (elements 64c + l and 64c + 32 + l), and per [BN, J]:
    d * scale and dmin * min of the low and the high sub-block.
    """
    return _k_tile(w, wh, row_base, blk, c, l, False)


@triton.jit
def q5_k_tile(w, wh, row_base, blk, c, l):
    """As q4_k_tile, for Q5_K's five-bit codes."""
    return _k_tile(w, wh, row_base, blk, c, l, True)


@triton.jit
def q6_k_tile(w, wh, row_base, blk, h, g, t):
    """Groups j of 16 lanes: super-block blk[j], half h[j] (0..1), group g[j] (0..1); t = arange(16).

    Lane t of group j carries four elements, 128h + 16g + t + 32i for i = 0..3; returns their codes
    q0..q3 [BN, J, 16] (minus 32) and their scales d * scale[8h + g + 2i] as s0..s3 [BN, J].
    """
    base = row_base[:, None] + (blk * 210)[None, :]  # [BN, J]
    lo_off = (64 * h + 16 * g)[None, :, None] + t[None, None, :]
    ql_a = tl.load(w + base[:, :, None] + lo_off)
    ql_b = tl.load(w + base[:, :, None] + lo_off + 32)
    qh = tl.load(w + base[:, :, None] + (128 + 32 * h + 16 * g)[None, :, None] + t[None, None, :])
    q0 = ((ql_a & 15) | ((qh & 3) << 4)).to(tl.float32) - 32.0
    q1 = ((ql_b & 15) | (((qh >> 2) & 3) << 4)).to(tl.float32) - 32.0
    q2 = ((ql_a >> 4) | (((qh >> 4) & 3) << 4)).to(tl.float32) - 32.0
    q3 = ((ql_b >> 4) | ((qh >> 6) << 4)).to(tl.float32) - 32.0
    d = tl.load(wh + (row_base // 2)[:, None] + (blk * 105 + 104)[None, :]).to(tl.float32)
    sbase = base + (192 + 8 * h + g)[None, :]
    s0 = d * tl.load(w + sbase).to(tl.int8, bitcast=True).to(tl.float32)
    s1 = d * tl.load(w + sbase + 2).to(tl.int8, bitcast=True).to(tl.float32)
    s2 = d * tl.load(w + sbase + 4).to(tl.int8, bitcast=True).to(tl.float32)
    s3 = d * tl.load(w + sbase + 6).to(tl.int8, bitcast=True).to(tl.float32)
    return q0, q1, q2, q3, s0, s1, s2, s3
