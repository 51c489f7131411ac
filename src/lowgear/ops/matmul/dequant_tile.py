"""Dequantize a band of a packed weight's rows on the GPU, for prefill through cuBLAS.

Prefill is compute-bound, and on sm < 80 Triton's `tl.dot` runs on CUDA cores, so the fast prefill
matmul is torch.matmul (tensor cores on every GPU) on a dequantized tile of rows. This kernel writes
that tile: one program per (BLOCK_N rows, NB blocks), codes and scales read through `unpack.py`, the
same helpers the decode GEMV uses. A caller bounds memory by choosing the band (row_start, row_stop).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import unpack
from .gguf_gemv import BLOCK_BYTES, BLOCK_SIZES, blocks_per_step


@triton.jit
def _tile_coords(R, bpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, tl.minimum(rows, R - 1).to(tl.int64) * bpr, rows.to(tl.int64)


@triton.jit
def dequant_q8_0_kernel(w, wh, out, R, K, bpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    rows, row_base, orow = _tile_coords(R, bpr, BLOCK_N)
    blk = tl.program_id(1) * NB + tl.arange(0, NB)
    e = tl.arange(0, 32)
    q, d = unpack.q8_0_tile(w, wh, row_base, blk, e)
    offs = (orow * K)[:, None, None] + (blk * 32)[None, :, None] + e[None, None, :]
    tl.store(out + offs, (q * d[:, :, None]).to(out.dtype.element_ty), mask=(rows < R)[:, None, None])


@triton.jit
def dequant_q4_0_kernel(w, wh, out, R, K, bpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    rows, row_base, orow = _tile_coords(R, bpr, BLOCK_N)
    blk = tl.program_id(1) * NB + tl.arange(0, NB)
    e = tl.arange(0, 16)
    lo, hi, d = unpack.q4_0_tile(w, wh, row_base, blk, e)
    offs = (orow * K)[:, None, None] + (blk * 32)[None, :, None] + e[None, None, :]
    mask = (rows < R)[:, None, None]
    tl.store(out + offs, (lo * d[:, :, None]).to(out.dtype.element_ty), mask=mask)
    tl.store(out + offs + 16, (hi * d[:, :, None]).to(out.dtype.element_ty), mask=mask)


@triton.jit
def dequant_q4_1_kernel(w, wh, out, R, K, bpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    rows, row_base, orow = _tile_coords(R, bpr, BLOCK_N)
    blk = tl.program_id(1) * NB + tl.arange(0, NB)
    e = tl.arange(0, 16)
    lo, hi, d, mn = unpack.q4_1_tile(w, wh, row_base, blk, e)
    offs = (orow * K)[:, None, None] + (blk * 32)[None, :, None] + e[None, None, :]
    mask = (rows < R)[:, None, None]
    tl.store(out + offs, (lo * d[:, :, None] + mn[:, :, None]).to(out.dtype.element_ty), mask=mask)
    tl.store(out + offs + 16, (hi * d[:, :, None] + mn[:, :, None]).to(out.dtype.element_ty), mask=mask)


@triton.jit
def dequant_q4_k_kernel(w, wh, out, R, K, bpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    rows, row_base, orow = _tile_coords(R, bpr, BLOCK_N)
    j = tl.arange(0, NB * 4)
    c = j % 4
    blk = tl.program_id(1) * NB + j // 4
    l = tl.arange(0, 32)
    lo, hi, s_lo, s_hi, m_lo, m_hi = unpack.q4_k_tile(w, wh, row_base, blk, c, l)
    offs = (orow * K)[:, None, None] + (blk * 256 + c * 64)[None, :, None] + l[None, None, :]
    mask = (rows < R)[:, None, None]
    tl.store(out + offs, (lo * s_lo[:, :, None] - m_lo[:, :, None]).to(out.dtype.element_ty), mask=mask)
    tl.store(out + offs + 32, (hi * s_hi[:, :, None] - m_hi[:, :, None]).to(out.dtype.element_ty), mask=mask)


@triton.jit
def dequant_q6_k_kernel(w, wh, out, R, K, bpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    rows, row_base, orow = _tile_coords(R, bpr, BLOCK_N)
    j = tl.arange(0, NB * 4)
    h = (j // 2) % 2
    g = j % 2
    blk = tl.program_id(1) * NB + j // 4
    t = tl.arange(0, 16)
    q0, q1, q2, q3, s0, s1, s2, s3 = unpack.q6_k_tile(w, wh, row_base, blk, h, g, t)
    offs = (orow * K)[:, None, None] + (blk * 256 + h * 128 + g * 16)[None, :, None] + t[None, None, :]
    mask = (rows < R)[:, None, None]
    ty = out.dtype.element_ty
    tl.store(out + offs, (q0 * s0[:, :, None]).to(ty), mask=mask)
    tl.store(out + offs + 32, (q1 * s1[:, :, None]).to(ty), mask=mask)
    tl.store(out + offs + 64, (q2 * s2[:, :, None]).to(ty), mask=mask)
    tl.store(out + offs + 96, (q3 * s3[:, :, None]).to(ty), mask=mask)


DEQUANT_KERNELS = {
    "Q8_0": dequant_q8_0_kernel,
    "Q4_0": dequant_q4_0_kernel,
    "Q4_1": dequant_q4_1_kernel,
    "Q4_K": dequant_q4_k_kernel,
    "Q6_K": dequant_q6_k_kernel,
}


def dequantize_tile(qtype: str, data: torch.Tensor, row_start: int, row_stop: int,
                    dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [row_start, row_stop) of a packed weight as a dense [rows, in_features] tensor.

    `data` is the whole uint8 [out_features, bytes_per_row] tensor (contiguous); `out`, if given,
    is a preallocated contiguous [rows, in_features] buffer of `dtype` to reuse across tiles.
    """
    if qtype not in DEQUANT_KERNELS:
        raise ValueError(f"no tile dequantizer for {qtype}")
    bs, bb = BLOCK_SIZES[qtype], BLOCK_BYTES[qtype]
    if data.dtype != torch.uint8 or data.dim() != 2 or not data.is_contiguous() or data.shape[1] % bb:
        raise ValueError(f"{qtype} data must be contiguous uint8 [rows, k/{bs}*{bb}], got "
                         f"{data.dtype} {tuple(data.shape)}")
    assert 0 <= row_start <= row_stop <= data.shape[0], (row_start, row_stop, data.shape[0])
    nblocks = data.shape[1] // bb
    k = nblocks * bs
    r = row_stop - row_start
    if out is None:
        out = torch.empty((r, k), dtype=dtype, device=data.device)
    assert out.shape == (r, k) and out.is_contiguous() and out.dtype == dtype
    if r == 0:
        return out
    band = data[row_start:row_stop]
    nb = blocks_per_step(nblocks, 8 if bs == 32 else 1)
    block_n = 8
    grid = (triton.cdiv(r, block_n), nblocks // nb)
    DEQUANT_KERNELS[qtype][grid](band, band.view(torch.float16), out, r, k, data.shape[1],
                                 BLOCK_N=block_n, NB=nb, num_warps=4)
    return out
