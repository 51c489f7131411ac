"""Decode GEMVs for the low-bit GGUF block formats: Q2_K, Q3_K, IQ4_NL, IQ4_XS.

Built like the kernels in `gguf_gemv.py` (one program owns BLOCK_N rows, walks K a few blocks at a
time, unpacks in registers, one fp32 accumulator per activation row, the scale factored out of each
sub-block's sum). Q2_K and Q3_K are K loops (`dot_q2_k`, `dot_q3_k`) that gguf_gemv.block_dot calls,
so the dense GEMV and the experts' one share them; the IQ4 types are kernels of their own. The layouts (formats/blocks.py has the byte counts):

    Q2_K   84 bytes / 256: scales[16] (low nibble scale, high nibble min, one per 16 elements),
           qs[64] (2-bit), f16 d, f16 dmin.  Element 16*sb + t (sb = 8h + 2s + half) is bits 2s..2s+1
           of qs[32h + 16*half + t]; value = d * sc[sb] * q - dmin * m[sb]
    Q3_K   110 bytes / 256: hmask[32], qs[64] (as Q2_K), 12 bytes of 6-bit scales, f16 d.  The third
           bit of element 16*sb + t is bit sb // 2 of hmask[16*half + t]; q = low - 4 when it is 0;
           scale sb: low 4 bits = byte sb % 8 >> 4 * (sb // 8), top 2 = byte 8 + sb % 4 >> 2 * (sb // 4);
           value = d * (scale - 32) * q
    IQ4_NL 18 bytes / 32: f16 d, 16 bytes of 4-bit indices (low nibbles elements 0-15);
           value = d * table[i]
    IQ4_XS 136 bytes / 256: f16 d, u16 scales_h, scales_l[4], qs[128]; sub-block ib of 32 has its
           indices in qs[16 ib .. 16 ib + 16] (low nibbles first), scale low 4 bits in nibble ib of
           scales_l, top 2 bits in bits 2 ib of scales_h; value = d * (scale - 32) * table[i]

The IQ4 table (16 float32 levels) is a device tensor built once per device (formats/dequant.iq4_table)
and read with a gather; it sits in L1 after the first touch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .gemv_common import _add_column, _halves_dot, _row_base, _store


@triton.jit
def _k2_codes(w, base, qoff, sb, t):
    """2-bit codes [BN, J, 16] of sub-blocks sb [J] (0..15): bytes at base + qoff + 32h + 16 half + t."""
    h = sb // 8
    s = (sb // 2) % 4
    half = sb % 2
    q = tl.load(w + base[:, :, None] + (qoff + 32 * h + 16 * half)[None, :, None] + t[None, None, :])
    return (q >> (2 * s)[None, :, None]) & 3


@triton.jit
def dot_q2_k(x_ptr, stride_xm, w, wh, row_base, K, M: tl.constexpr, M_PAD: tl.constexpr,
             BLOCK_N: tl.constexpr, NB: tl.constexpr):
    """Q2_K's K loop, as gguf_gemv.block_dot's (which calls it)."""
    j = tl.arange(0, NB * 16)  # 16-element sub-blocks: super-block j // 16, sub-block j % 16
    sb = j % 16
    t = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
    for b0 in range(0, K // 256, NB):
        blk = b0 + j // 16
        base = row_base[:, None] + (blk * 84)[None, :]  # [BN, J]
        q = _k2_codes(w, base, 16, sb, t).to(tl.float32)
        sm = tl.load(w + base + sb[None, :])
        hbase = (row_base // 2)[:, None] + (blk * 42)[None, :]
        sc = tl.load(wh + hbase + 40).to(tl.float32) * (sm & 15).to(tl.float32)
        mn = tl.load(wh + hbase + 41).to(tl.float32) * (sm >> 4).to(tl.float32)
        xoff = (blk * 256 + sb * 16)[:, None] + t[None, :]
        for m in tl.static_range(M):
            xv = tl.load(x_ptr + m * stride_xm + xoff).to(tl.float32)
            part = sc * tl.sum(q * xv[None, :, :], axis=2) - mn * tl.sum(xv, axis=1)[None, :]
            acc = _add_column(acc, tl.sum(part, axis=1), m, M_PAD)
    return acc


@triton.jit
def dot_q3_k(x_ptr, stride_xm, w, wh, row_base, K, M: tl.constexpr, M_PAD: tl.constexpr,
             BLOCK_N: tl.constexpr, NB: tl.constexpr):
    """Q3_K's K loop, as gguf_gemv.block_dot's (which calls it)."""
    j = tl.arange(0, NB * 16)
    sb = j % 16
    t = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
    for b0 in range(0, K // 256, NB):
        blk = b0 + j // 16
        base = row_base[:, None] + (blk * 110)[None, :]
        low = _k2_codes(w, base, 32, sb, t)
        hm = tl.load(w + base[:, :, None] + (16 * (sb % 2))[None, :, None] + t[None, None, :])
        hbit = (hm >> (sb // 2)[None, :, None]) & 1
        q = low.to(tl.float32) - 4.0 * (1 - hbit).to(tl.float32)
        s_lo = (tl.load(w + base + (96 + sb % 8)[None, :]) >> (4 * (sb // 8))[None, :]) & 15
        s_hi = (tl.load(w + base + (104 + sb % 4)[None, :]) >> (2 * (sb // 4))[None, :]) & 3
        scale = (s_lo | (s_hi << 4)).to(tl.float32) - 32.0
        d = tl.load(wh + (row_base // 2)[:, None] + (blk * 55 + 54)[None, :]).to(tl.float32)
        sc = d * scale
        xoff = (blk * 256 + sb * 16)[:, None] + t[None, :]
        for m in tl.static_range(M):
            xv = tl.load(x_ptr + m * stride_xm + xoff).to(tl.float32)
            acc = _add_column(acc, tl.sum(sc * tl.sum(q * xv[None, :, :], axis=2), axis=1), m, M_PAD)
    return acc


@triton.jit
def gemv_iq4_nl_kernel(x_ptr, w, wh, tab, y_ptr, N, K, bpr, stride_xm, stride_ym,
                       M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    rows, row_base = _row_base(N, bpr, BLOCK_N)
    e = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
    for b0 in range(0, K // 32, NB):
        blk = b0 + tl.arange(0, NB)
        q = tl.load(w + row_base[:, None, None] + (blk * 18 + 2)[None, :, None] + e[None, None, :])
        lo = tl.load(tab + (q & 15).to(tl.int32))
        hi = tl.load(tab + (q >> 4).to(tl.int32))
        d = tl.load(wh + (row_base // 2)[:, None] + (blk * 9)[None, :]).to(tl.float32)
        xoff = blk[:, None] * 32 + e[None, :]
        for m in tl.static_range(M):
            s = _halves_dot(x_ptr, m * stride_xm, xoff, lo, hi, 16)
            acc = _add_column(acc, tl.sum(s * d, axis=1), m, M_PAD)
    _store(y_ptr, acc, rows, N, stride_ym, M, M_PAD)


@triton.jit
def gemv_iq4_xs_kernel(x_ptr, w, wh, tab, y_ptr, N, K, bpr, stride_xm, stride_ym,
                       M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    rows, row_base = _row_base(N, bpr, BLOCK_N)
    j = tl.arange(0, NB * 8)  # 32-element sub-blocks: super-block j // 8, sub-block j % 8
    ib = j % 8
    t = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
    for b0 in range(0, K // 256, NB):
        blk = b0 + j // 8
        base = row_base[:, None] + (blk * 136)[None, :]
        q = tl.load(w + base[:, :, None] + (8 + 16 * ib)[None, :, None] + t[None, None, :])
        lo = tl.load(tab + (q & 15).to(tl.int32))
        hi = tl.load(tab + (q >> 4).to(tl.int32))
        s_lo = (tl.load(w + base + (4 + ib // 2)[None, :]) >> (4 * (ib % 2))[None, :]) & 15
        s_hi = (tl.load(w + base + (2 + ib // 4)[None, :]) >> (2 * (ib % 4))[None, :]) & 3
        d = tl.load(wh + (row_base // 2)[:, None] + (blk * 68)[None, :]).to(tl.float32)
        sc = d * ((s_lo | (s_hi << 4)).to(tl.float32) - 32.0)
        xoff = (blk * 256 + ib * 32)[:, None] + t[None, :]
        for m in tl.static_range(M):
            s = _halves_dot(x_ptr, m * stride_xm, xoff, lo, hi, 16)
            acc = _add_column(acc, tl.sum(s * sc, axis=1), m, M_PAD)
    _store(y_ptr, acc, rows, N, stride_ym, M, M_PAD)


LOW_BIT_KERNELS = {  # Q2_K and Q3_K run in gguf_gemv.gemv_block_kernel through dot_q2_k / dot_q3_k
    "IQ4_NL": gemv_iq4_nl_kernel,
    "IQ4_XS": gemv_iq4_xs_kernel,
}
TABLE_QTYPES = ("IQ4_NL", "IQ4_XS")  # kernels that take the IQ4 level table after `wh`
