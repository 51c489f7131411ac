"""The split-K decode's second kernel: a sequence's head output from its splits' partial outputs, each
weighted by its log-sum-exp (paged_decode.py; skipped when a launch has one split)."""

from __future__ import annotations

import triton
import triton.language as tl

from .. import pdl


@triton.jit
def paged_decode_reduce_kernel(
    part_o_ptr,  # [B, H, NUM_SPLITS, D] fp32
    part_lse_ptr,  # [B, H, NUM_SPLITS] fp32, log2 domain
    out_ptr,  # [B, H, D]
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    NUM_SPLITS_P: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.wait(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS_P)
    offs_d = tl.arange(0, HEAD_DIM_P)
    s_ok = offs_s < NUM_SPLITS
    d_ok = offs_d < HEAD_DIM
    row = (seq * tl.num_programs(1) + head) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + row + offs_s, mask=s_ok, other=float("-inf"))
    # Split 0 always holds the window's first position, so the max is finite.
    w = tl.exp2(lse - tl.max(lse, axis=0))  # [NUM_SPLITS_P], 0 for empty splits
    full = s_ok & (lse > float("-inf"))  # empty splits wrote no output
    o = tl.load(part_o_ptr + (row + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=full[:, None] & d_ok[None, :], other=0.0)
    o = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=d_ok)
