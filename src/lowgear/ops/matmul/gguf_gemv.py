"""Decode matmuls that read quantized weights in their packed form: y[M, N] = x[M, K] @ W[N, K].T.

Decode is memory-bound, so these kernels are built to read each weight byte once and do little
else: a program owns BLOCK_N output rows, walks K a few blocks at a time, unpacks codes and scales
in registers (`unpack.py`), and keeps an fp32 accumulator per activation row (M <= 16). They use no
`tl.dot`: Triton lowers it to plain FMAs on sm_70/75 anyway, and a GEMV has no reuse for tensor
cores to exploit, so the same kernels serve a V100, a T4 and an H100. The block scale is factored out
of each block's sum (sum(code * x) * scale), so the per-element work is one multiply-add.
One kernel, `gemv_block_kernel`, serves every type but IQ4_NL / IQ4_XS (gguf_gemv_low.py): its K loop
is `block_dot` (per format at compile time), which the experts' GEMV (`moe_gemv.py`) also runs on
the rows of an expert chosen on the device.

Larger M (prefill) belongs to `dequant_tile.py` + cuBLAS; `packed_matmul` does that itself past
MAX_M so it is always correct, but a caller that knows it is prefilling should tile on its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats.dequant import iq4_table
from . import unpack
from .gemv_common import _add_column, _halves_dot, _row_base, _store
from .gguf_gemv_low import LOW_BIT_KERNELS, TABLE_QTYPES, dot_q2_k, dot_q3_k

MAX_M = 16
BLOCK_SIZES = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256,
               "Q2_K": 256, "Q3_K": 256, "IQ4_NL": 32, "IQ4_XS": 256}
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210,
               "Q2_K": 84, "Q3_K": 110, "IQ4_NL": 18, "IQ4_XS": 136}
FLOAT_QTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


@triton.jit
def _dot_q8_0(x_ptr, stride_xm, w, wh, row_base, K, M: tl.constexpr, M_PAD: tl.constexpr,
              BLOCK_N: tl.constexpr, NB: tl.constexpr):
    e = tl.arange(0, 32)
    acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
    for b0 in range(0, K // 32, NB):
        blk = b0 + tl.arange(0, NB)
        q, d = unpack.q8_0_tile(w, wh, row_base, blk, e)
        xoff = blk[:, None] * 32 + e[None, :]
        for m in tl.static_range(M):
            xv = tl.load(x_ptr + m * stride_xm + xoff).to(tl.float32)
            part = tl.sum(tl.sum(q * xv[None, :, :], axis=2) * d, axis=1)
            acc = _add_column(acc, part, m, M_PAD)
    return acc


@triton.jit
def _dot_halves(x_ptr, stride_xm, w, wh, row_base, K, FMT: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr,
                BLOCK_N: tl.constexpr, NB: tl.constexpr):
    """The 32-element blocks of two 16-element halves: Q4_0 / Q5_0 (d * code) and Q4_1 / Q5_1 (d * code + m)."""
    e = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
    for b0 in range(0, K // 32, NB):
        blk = b0 + tl.arange(0, NB)
        xoff = blk[:, None] * 32 + e[None, :]
        if FMT == "Q4_0" or FMT == "Q5_0":
            if FMT == "Q4_0":
                lo, hi, d = unpack.q4_0_tile(w, wh, row_base, blk, e)
            else:
                lo, hi, d = unpack.q5_0_tile(w, wh, row_base, blk, e)
            for m in tl.static_range(M):
                s = _halves_dot(x_ptr, m * stride_xm, xoff, lo, hi, 16)
                acc = _add_column(acc, tl.sum(s * d, axis=1), m, M_PAD)
        else:
            if FMT == "Q4_1":
                lo, hi, d, mn = unpack.q4_1_tile(w, wh, row_base, blk, e)
            else:
                lo, hi, d, mn = unpack.q5_1_tile(w, wh, row_base, blk, e)
            for m in tl.static_range(M):
                xl = tl.load(x_ptr + m * stride_xm + xoff).to(tl.float32)
                xh = tl.load(x_ptr + m * stride_xm + xoff + 16).to(tl.float32)
                s = tl.sum(lo * xl[None, :, :] + hi * xh[None, :, :], axis=2)
                xsum = tl.sum(xl + xh, axis=1)  # [NB]: the min term needs only sum(x) per block
                acc = _add_column(acc, tl.sum(s * d + mn * xsum[None, :], axis=1), m, M_PAD)
    return acc


@triton.jit
def _dot_k(x_ptr, stride_xm, w, wh, row_base, K, FMT: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr,
           BLOCK_N: tl.constexpr, NB: tl.constexpr):
    """Q4_K / Q5_K: 64-element chunks of two 32-element sub-blocks, d * sc * code - dmin * m."""
    j = tl.arange(0, NB * 4)  # 64-element chunks: super-block j // 4, chunk j % 4
    c = j % 4
    l = tl.arange(0, 32)
    acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
    for b0 in range(0, K // 256, NB):
        blk = b0 + j // 4
        if FMT == "Q4_K":
            lo, hi, s_lo, s_hi, m_lo, m_hi = unpack.q4_k_tile(w, wh, row_base, blk, c, l)
        else:
            lo, hi, s_lo, s_hi, m_lo, m_hi = unpack.q5_k_tile(w, wh, row_base, blk, c, l)
        xoff = (blk * 256 + c * 64)[:, None] + l[None, :]
        for m in tl.static_range(M):
            xl = tl.load(x_ptr + m * stride_xm + xoff).to(tl.float32)
            xh = tl.load(x_ptr + m * stride_xm + xoff + 32).to(tl.float32)
            part = (s_lo * tl.sum(lo * xl[None, :, :], axis=2) + s_hi * tl.sum(hi * xh[None, :, :], axis=2)
                    - m_lo * tl.sum(xl, axis=1)[None, :] - m_hi * tl.sum(xh, axis=1)[None, :])
            acc = _add_column(acc, tl.sum(part, axis=1), m, M_PAD)
    return acc


@triton.jit
def _dot_q6_k(x_ptr, stride_xm, w, wh, row_base, K, M: tl.constexpr, M_PAD: tl.constexpr,
              BLOCK_N: tl.constexpr, NB: tl.constexpr):
    j = tl.arange(0, NB * 4)  # 16-lane groups: super-block j // 4, half (j // 2) % 2, group j % 2
    h = (j // 2) % 2
    g = j % 2
    t = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
    for b0 in range(0, K // 256, NB):
        blk = b0 + j // 4
        q0, q1, q2, q3, s0, s1, s2, s3 = unpack.q6_k_tile(w, wh, row_base, blk, h, g, t)
        xoff = (blk * 256 + h * 128 + g * 16)[:, None] + t[None, :]
        for m in tl.static_range(M):
            xp = x_ptr + m * stride_xm + xoff
            x0 = tl.load(xp).to(tl.float32)
            x1 = tl.load(xp + 32).to(tl.float32)
            x2 = tl.load(xp + 64).to(tl.float32)
            x3 = tl.load(xp + 96).to(tl.float32)
            part = (s0 * tl.sum(q0 * x0[None, :, :], axis=2) + s1 * tl.sum(q1 * x1[None, :, :], axis=2)
                    + s2 * tl.sum(q2 * x2[None, :, :], axis=2) + s3 * tl.sum(q3 * x3[None, :, :], axis=2))
            acc = _add_column(acc, tl.sum(part, axis=1), m, M_PAD)
    return acc


@triton.jit
def block_dot(x_ptr, stride_xm, w, wh, row_base, K, FMT: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr,
              BLOCK_N: tl.constexpr, NB: tl.constexpr):
    """acc [BLOCK_N, M_PAD] float32: column m is the dot of activation row x_ptr + m * stride_xm with each of
    the BLOCK_N weight rows starting at byte row_base [BLOCK_N] (int64) of `w` (`wh`: the same bytes as
    float16), K elements of FMT's blocks, NB blocks a step (K a multiple of NB blocks). The whole K loop
    of a GGUF block GEMV, shared by the dense kernel below and the experts' (moe_gemv.py)."""
    if FMT == "Q8_0":
        acc = _dot_q8_0(x_ptr, stride_xm, w, wh, row_base, K, M, M_PAD, BLOCK_N, NB)
    elif FMT == "Q4_K" or FMT == "Q5_K":
        acc = _dot_k(x_ptr, stride_xm, w, wh, row_base, K, FMT, M, M_PAD, BLOCK_N, NB)
    elif FMT == "Q6_K":
        acc = _dot_q6_k(x_ptr, stride_xm, w, wh, row_base, K, M, M_PAD, BLOCK_N, NB)
    elif FMT == "Q2_K":
        acc = dot_q2_k(x_ptr, stride_xm, w, wh, row_base, K, M, M_PAD, BLOCK_N, NB)
    elif FMT == "Q3_K":
        acc = dot_q3_k(x_ptr, stride_xm, w, wh, row_base, K, M, M_PAD, BLOCK_N, NB)
    else:
        acc = _dot_halves(x_ptr, stride_xm, w, wh, row_base, K, FMT, M, M_PAD, BLOCK_N, NB)
    return acc


@triton.jit
def gemv_block_kernel(x_ptr, w, wh, y_ptr, N, K, bpr, stride_xm, stride_ym, FMT: tl.constexpr,
                      M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    rows, row_base = _row_base(N, bpr, BLOCK_N)
    acc = block_dot(x_ptr, stride_xm, w, wh, row_base, K, FMT, M, M_PAD, BLOCK_N, NB)
    _store(y_ptr, acc, rows, N, stride_ym, M, M_PAD)


@triton.jit
def float_dot(x_ptr, stride_xm, w_ptr, row_base, K, M: tl.constexpr, M_PAD: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """block_dot for float rows (row_base in elements); any K (the tail is masked)."""
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + k
        kmask = kk < K
        wv = tl.load(w_ptr + row_base[:, None] + kk[None, :], mask=kmask[None, :], other=0.0).to(tl.float32)
        for m in tl.static_range(M):
            xv = tl.load(x_ptr + m * stride_xm + kk, mask=kmask, other=0.0).to(tl.float32)
            acc = _add_column(acc, tl.sum(wv * xv[None, :], axis=1), m, M_PAD)
    return acc


@triton.jit
def gemv_float_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_wn, stride_xm, stride_ym,
                      M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_base = tl.minimum(rows, N - 1).to(tl.int64) * stride_wn
    acc = float_dot(x_ptr, stride_xm, w_ptr, row_base, K, M, M_PAD, BLOCK_N, BLOCK_K)
    _store(y_ptr, acc, rows, N, stride_ym, M, M_PAD)


BLOCK_DOT_QTYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # block_dot's FMT
QUANT_KERNELS = {**{q: gemv_block_kernel for q in BLOCK_DOT_QTYPES}, **LOW_BIT_KERNELS}


def supports(qtype: str) -> bool:
    """Whether `packed_matmul` has a kernel for this GGUF type name (or F16 / BF16 / F32)."""
    return qtype in QUANT_KERNELS or qtype in FLOAT_QTYPES


def blocks_per_step(nblocks: int, target: int) -> int:
    """The largest power of two <= target that divides nblocks (the kernels take whole steps)."""
    nb = 1
    while nb * 2 <= target and nblocks % (nb * 2) == 0:
        nb *= 2
    return nb


def launch_params(qtype: str, n: int, k: int) -> dict[str, int]:
    """BLOCK_N / NB (blocks per K step) / num_warps for one weight shape.

    About 2k weight elements per program step across 4 warps keeps ~16 values per thread in flight
    and the loads wide; 8 rows per program gives N / 8 programs, 4+ per SM at 4096 rows on an H100.
    """
    if qtype in FLOAT_QTYPES:
        return {"BLOCK_N": 8, "BLOCK_K": 256 if k >= 256 else triton.next_power_of_2(k), "num_warps": 4}
    bs = BLOCK_SIZES[qtype]
    target = 8 if bs == 32 else 1
    return {"BLOCK_N": 8, "NB": blocks_per_step(k // bs, target), "num_warps": 4}


def _check(qtype: str, data: torch.Tensor, n: int, k: int) -> None:
    if qtype in FLOAT_QTYPES:
        if data.shape != (n, k) or data.stride(1) != 1:
            raise ValueError(f"{qtype} weight must be [{n}, {k}] with unit stride along K, got "
                             f"{tuple(data.shape)} strides {data.stride()}")
        return
    if qtype not in QUANT_KERNELS:
        raise ValueError(f"no packed kernel for {qtype}")
    bs, bb = BLOCK_SIZES[qtype], BLOCK_BYTES[qtype]
    if k % bs:
        raise ValueError(f"{qtype} needs in_features to be a multiple of {bs}, got {k}")
    if data.dtype != torch.uint8 or tuple(data.shape) != (n, k // bs * bb) or not data.is_contiguous():
        raise ValueError(f"{qtype} data must be contiguous uint8 [{n}, {k // bs * bb}], got "
                         f"{data.dtype} {tuple(data.shape)}")


def packed_gemv(x: torch.Tensor, qtype: str, data: torch.Tensor, n: int, k: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, n] = x [M, k] @ dequant(data).T for M <= MAX_M, in x's dtype, one kernel launch.

    x must have unit stride along k; `out` (if given) must be [M, n] with unit stride along n, so a
    CUDA-graph-captured step can reuse a preallocated buffer.
    """
    m = x.shape[0]
    assert 1 <= m <= MAX_M and x.shape[1] == k and x.stride(1) == 1, (tuple(x.shape), x.stride())
    _check(qtype, data, n, k)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
    p = launch_params(qtype, n, k)
    grid = (triton.cdiv(n, p["BLOCK_N"]),)
    m_pad = triton.next_power_of_2(m)
    if qtype in FLOAT_QTYPES:
        gemv_float_kernel[grid](x, data, y, n, k, data.stride(0), x.stride(0), y.stride(0),
                                M=m, M_PAD=m_pad, BLOCK_N=p["BLOCK_N"], BLOCK_K=p["BLOCK_K"],
                                num_warps=p["num_warps"])
        return y
    bpr = data.shape[1]
    table = (iq4_table(x.device),) if qtype in TABLE_QTYPES else ()
    fmt = {"FMT": qtype} if qtype in BLOCK_DOT_QTYPES else {}
    QUANT_KERNELS[qtype][grid](x, data, data.view(torch.float16), *table, y, n, k, bpr, x.stride(0), y.stride(0),
                               M=m, M_PAD=m_pad, BLOCK_N=p["BLOCK_N"], NB=p["NB"],
                               num_warps=p["num_warps"], **fmt)
    return y
