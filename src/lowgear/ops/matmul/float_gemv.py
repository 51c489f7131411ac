"""Decode GEMV over float16 / bfloat16 weights: split-K, launched as the packed GEMVs are.

A float16 model's decode step at batch 1 is nine kernels a layer, four of them cuBLAS matmuls. In a
CUDA graph on sm_90 the Triton kernels between them launch early (programmatic dependent launch,
pdl.py) but a cuBLAS kernel neither waits in that way nor lets the next kernel in early, so every
matmul/glue boundary costs a full drain and ramp. This kernel does the matmul for a few rows with
the same launch as the GPTQ GEMV: it issues its first weight loads, then waits for the kernel
before it, and releases the next one after its main loop.

    program (row block n, K-split s): for each BLOCK_K slice of its K range
        w    [BLOCK_N, BLOCK_K]          16 bytes a thread along K (a warp reads 512 contiguous bytes)
        acc  [M_PAD, BLOCK_N, BLOCK_K]  += w * x (fp32, elementwise: no cross-lane sum in the loop)
    then acc summed over K once, and the K-splits added by the last program of the row block in split
    order (splitk.py: deterministic, one launch).

Nothing here uses tl.dot (sm_70 / sm_75 safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import pdl
from . import splitk

# rows the kernel takes at most, and rows `float_matmul` gives it (more go to cuBLAS)
# why (these and the launch rule below): docs/decisions/006-float16-gemv.md
MAX_M = 4
ROUTED_M = 1
# K slices of 512 with 8-row blocks, K split only while few programs run; layers with very many row
# blocks keep 256-wide slices of 16 rows
BLOCK_K = 512
BLOCK_K_MANY_ROWS = 256
MANY_ROW_BLOCKS = 16 * 132  # row blocks (at BLOCK_K) past which the 256-wide slice is used
# K is split only until about this many programs run (two per SM of an H100 / H200)
TARGET_PROGRAMS = 2 * 132


@triton.jit
def float_gemv_kernel(x_ptr, w_ptr, y_ptr, part_ptr, cnt_ptr, N, K, k_per_split, stride_xm, stride_wn,
                      M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      S_CHUNK: tl.constexpr, PDL: tl.constexpr):
    """y[m, n] = sum over k of x[m, k] * w[n, k]; this program sums its K-slice (`splitk.finish`)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ms = tl.arange(0, M_PAD)
    mmask = ms < M
    ks = tl.arange(0, BLOCK_K)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_base = w_ptr + rows.to(tl.int64)[None, :, None] * stride_wn  # [1, BLOCK_N, 1]
    acc = tl.zeros((M_PAD, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + ks
        kmask = k < k_hi
        w = tl.load(w_base + k[None, None, :], mask=rmask[None, :, None] & kmask[None, None, :], other=0.0)
        pdl.wait(PDL)  # the first tile's weights are in flight; x is the previous kernel's output
        x = tl.load(x_ptr + ms[:, None, None] * stride_xm + k[None, None, :],
                    mask=mmask[:, None, None] & kmask[None, None, :], other=0.0)  # [M_PAD, 1, BLOCK_K]
        acc += w.to(tl.float32) * x.to(tl.float32)
    pdl.wait(PDL)  # (a program with no tiles) before the partials and counters
    pdl.release(PDL)
    splitk.finish(tl.sum(acc, axis=2), y_ptr, part_ptr, cnt_ptr, ms[:, None] * N + rows[None, :],
                  mmask[:, None] & rmask[None, :], pid_n, pid_k, tl.num_programs(1), M * N, S_CHUNK)


def launch_params(n: int, k: int, m: int, split: int | None = None, block_n: int | None = None,
                  num_warps: int | None = None, block_k: int | None = None) -> dict[str, int]:
    """BLOCK_N / BLOCK_K / split / num_warps: BLOCK_N keeps the accumulator near 32 fp32 a thread
    (M_PAD x BLOCK_N x BLOCK_K / threads), BLOCK_K is 512 unless the layer has MANY_ROW_BLOCKS row
    blocks even so (then 256), and K is split until about TARGET_PROGRAMS run."""
    m_pad = triton.next_power_of_2(m)
    num_warps = num_warps or 4

    def rows_for(bk: int) -> int:
        return block_n or max(1, 32 * 32 * num_warps // (m_pad * bk))

    if block_k is None:
        block_k = BLOCK_K_MANY_ROWS if triton.cdiv(n, rows_for(BLOCK_K)) > MANY_ROW_BLOCKS else BLOCK_K
    block_k = min(block_k, triton.next_power_of_2(k))
    block_n = rows_for(block_k)
    n_blocks = triton.cdiv(n, block_n)
    tiles = triton.cdiv(k, block_k)
    split = max(1, min(tiles, split or triton.cdiv(TARGET_PROGRAMS, n_blocks)))
    k_per_split = triton.cdiv(tiles, split) * block_k
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": num_warps, "split": triton.cdiv(k, k_per_split),
            "k_per_split": k_per_split}


def float_gemv(x: torch.Tensor, w: torch.Tensor, *, split: int | None = None, block_n: int | None = None,
               num_warps: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ w.T for M <= MAX_M, w [N, K] with unit stride along K; in x's dtype.
    The keyword overrides go to `launch_params` (the benchmarks sweep them)."""
    m, k = x.shape
    n = w.shape[0]
    assert 1 <= m <= MAX_M and w.shape[1] == k and w.stride(1) == 1 and x.stride(1) == 1, (x.shape, w.shape)
    p = launch_params(n, k, m, split, block_n, num_warps, block_k)
    grid = (triton.cdiv(n, p["BLOCK_N"]), p["split"])
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    m_pad = triton.next_power_of_2(m)
    float_gemv_kernel[grid](x, w, y, splitk.workspace(grid[1], m, n, x.device),
                            splitk.counters(x.device, grid[0] if grid[1] > 1 else 1),
                            n, k, p["k_per_split"], x.stride(0), w.stride(0),
                            M=m, M_PAD=m_pad, BLOCK_N=p["BLOCK_N"], BLOCK_K=p["BLOCK_K"],
                            S_CHUNK=splitk.chunk(m_pad * p["BLOCK_N"] // (32 * p["num_warps"])),
                            num_warps=p["num_warps"], **pdl.launch(x.device, m))
    return y


def float_matmul(x: torch.Tensor, module) -> torch.Tensor:
    """The QuantLinear hook for float weights: the GEMV for up to ROUTED_M rows of float16 / bfloat16,
    cuBLAS otherwise (the bias is the module's business)."""
    w = module.weight
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.shape[1])
    if 1 <= x2.shape[0] <= ROUTED_M and x2.dtype == w.dtype and w.stride(1) == 1:
        return float_gemv(x2 if x2.stride(1) == 1 else x2.contiguous(), w).reshape(*lead, w.shape[0])
    return torch.matmul(x.to(w.dtype), w.t()).to(x.dtype)
