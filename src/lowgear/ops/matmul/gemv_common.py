"""Pieces the GGUF decode GEMVs share (gguf_gemv.py, gguf_gemv_low.py): a program's rows, and the
accumulator's columns and store."""

import triton
import triton.language as tl


@triton.jit
def _add_column(acc, part, m: tl.constexpr, M_PAD: tl.constexpr):
    """acc[:, m] += part, without indexing (Triton tensors cannot be written at an index)."""
    cols = tl.arange(0, M_PAD)
    return acc + tl.where(cols[None, :] == m, part[:, None], 0.0)


@triton.jit
def _store(y_ptr, acc, rows, N, stride_ym, M: tl.constexpr, M_PAD: tl.constexpr):
    cols = tl.arange(0, M_PAD)
    mask = (rows[:, None] < N) & (cols[None, :] < M)
    offs = cols[None, :] * stride_ym + rows[:, None]
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_base(N, bpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # clamp rather than mask: the loads stay unmasked (vectorizable), the store drops the extras
    return rows, tl.minimum(rows, N - 1).to(tl.int64) * bpr


@triton.jit
def _halves_dot(x_ptr, row, xoff, lo, hi, HALF: tl.constexpr):
    """Per block of two halves, sum(lo * x[first half]) + sum(hi * x[second half]) for the activation
    row at x_ptr + row: lo / hi [BN, J, HALF] the halves' values, xoff [J, HALF] the first half's offsets."""
    xl = tl.load(x_ptr + row + xoff).to(tl.float32)
    xh = tl.load(x_ptr + row + xoff + HALF).to(tl.float32)
    return tl.sum(lo * xl[None, :, :] + hi * xh[None, :, :], axis=2)
