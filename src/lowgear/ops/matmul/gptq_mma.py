"""Batched-decode GPTQ matmul (MAX_M < M <= MMA_MAX_M rows): packed codes unpacked in registers, then tl.dot.

Between the GEMV (one FMA per code per activation row, so its time grows with M) and the prefill path
(W.T dequantized to a float buffer, then cuBLAS: ~4 bytes written and read per weight on top of the
packed read) sits a batch of 16-64 decode rows, where both are far slower than one read of the
packed weights (docs/decisions/004-gemv-row-limits.md). This kernel reads the codes once and lets
the tensor cores do the row work:

    program (column block n, K-split s): for each BLOCK_K tile of its K-slice
        codes [BLOCK_K, BLOCK_N]  from qweight, word row k // PACK (a warp reads contiguous N words;
                                  the PACK rows sharing a word hit L1), shifted and masked in registers
        p     [M_PAD, BLOCK_N]    = tl.dot(x tile [M_PAD, BLOCK_K], codes as x's dtype)   (exact ints)
        acc  += (p - sum_k x * zero) * scale       one group per tile, so scale and zero factor out

Factoring the group's scale and zero out of the tile (as the GEMV does) leaves two integer ops and a
conversion per code, and the dot sees exact small integers (every code <= 255 is exact in fp16 and
bf16), so the only roundings are x's own and the fp32 accumulation. A tile must lie inside one
quantization group: BLOCK_K divides the group size (16 <= BLOCK_K; K may end in a short group).

tl.dot is a tensor-core `mma` only on sm_80+; Triton 3.6 lowers it to FMAs for sm_70 / sm_75
(Triton uses no tensor cores there), so `gptq.gptq_matmul` routes here only for compute capability >= (8, 0) and fp16 / bf16
activations, and for bits in MMA_BITS (3-bit codes straddle words: they stay on the GEMV / prefill
paths). Split-K and the act-order layout are the GEMV's: partial sums go to an fp32 workspace
[splits, M, N] that the last program of each tile adds in split order (`splitk.py`), and act-order
layers use `prepare`'s sorted qweight + perm, x's columns gathered through perm in the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import pdl
from ...formats.gptq import gptq_groups, zero_row
from . import splitk
from .unpack import stream_code

# rows served here past the GEMV; beyond it prefill (dequantize + cuBLAS) is compute-bound and wins
MMA_MAX_M = 64
# code widths served: 2, 4 and 8 (codes within a word) and 6 (16 codes in 3 words; GGUF's 5/6-bit types)
MMA_BITS = (2, 4, 6, 8)
# programs to aim for: two per SM of an H100 (132 SMs), enough loads in flight to cover latency
TARGET_PROGRAMS = 2 * 132
# split-K stops where the fp32 partials (written and read: 8 * splits * M * N bytes) would pass this
# fraction of the packed weight bytes (N * K * bits / 8)
MAX_PARTIAL_FRACTION = 0.25
# rows up to which the word tile goes to the mma operand as loaded (WORDS), with its own launch shape: BLOCK_N
# WORDS_BLOCK_N (WORDS_WIDE_BLOCK_N from WORDS_WIDE_N output rows), split to TARGET_PROGRAMS with no partial cap.
# why: docs/decisions/024-mma-word-operands.md
WORDS_MAX_M = 16
WORDS_BLOCK_N = 256
WORDS_WIDE_N, WORDS_WIDE_BLOCK_N = 16384, 128


@triton.jit
def _as_float(codes, dtype: tl.constexpr, FP16_MAGIC: tl.constexpr):
    """Integer codes (>= 0) as exact floats of x's 16-bit dtype."""
    if FP16_MAGIC:  # OR-ed into the mantissa of 1024 (fp16) or 128 (bf16, codes < 16 only), bit-cast, and that
        # base subtracted: exact, no conversion instruction
        MAGIC: tl.constexpr = 0x6400 if dtype == tl.float16 else 0x4300
        BASE: tl.constexpr = 1024.0 if dtype == tl.float16 else 128.0
        return (codes | MAGIC).to(tl.int16).to(dtype, bitcast=True) - BASE
    else:  # OR-ed into the mantissa of 2**23 in fp32, subtracted, then converted to x's dtype
        return ((codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0).to(dtype)


@triton.jit
def gptq_mma_kernel(x_ptr, qw_ptr, zf_ptr, sc_ptr, perm_ptr, y_ptr, part_ptr, cnt_ptr,
                    M, N, K, k_per_split, group_size, stride_xm,
                    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    HAS_PERM: tl.constexpr, S_CHUNK: tl.constexpr, PDL: tl.constexpr,
                    FP16_MAGIC: tl.constexpr, WORDS: tl.constexpr = False, ZROW: tl.constexpr = False):
    """y[m, n] = sum over k of x[m, k] * W[n, k], W = (q - zf) * scale; this program sums its K-slice.
    ZROW: zf is one row [1, N] for every group."""
    RGW: tl.constexpr = 1 if 32 % BITS == 0 else 3  # int32 words a row-group (PACK codes) takes
    PACK: tl.constexpr = 32 * RGW // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ms = tl.arange(0, BLOCK_M)
    mmask = ms < M
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # the first tile's codes asked of L2, then the wait before the loop: the software pipeliner copies
    # the first tiles of x (and the codes) before the loop, so a wait inside it would come after reads
    # of the previous kernel's output (pdl.py; tests/test_pdl.py checks the PTX)
    NL: tl.constexpr = BLOCK_N // 32 if BLOCK_N > 32 else 1
    NR: tl.constexpr = BLOCK_K // PACK if BLOCK_K > PACK else 1
    lines = tl.minimum(pid_n * BLOCK_N + tl.arange(0, NL) * 32, N - 1)  # a word per 128 bytes
    prow = tl.minimum(k_lo // PACK * RGW + tl.arange(0, NR), (K - 1) // PACK * RGW)
    pdl.prefetch_l2(qw_ptr + prow.to(tl.int64)[:, None] * N + lines[None, :], PDL)
    pdl.wait(PDL)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if WORDS:  # the word tile [BLOCK_K / PACK, BLOCK_N] goes to the mma operand layout as loaded; code j of
            # word row r is input feature k0 + r * PACK + j, one K = BLOCK_K / PACK dot per j (docs/decisions/024)
            rows = k0 // PACK + tl.arange(0, NR)
            rmask = rows * PACK < k_hi
            words = tl.load(qw_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :],
                            mask=rmask[:, None] & cmask[None, :], other=0)
            p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for j in tl.static_range(PACK):
                xk = rows * PACK + j
                if HAS_PERM:
                    xk = tl.load(perm_ptr + xk, mask=rmask, other=0)
                xj = tl.load(x_ptr + ms[:, None] * stride_xm + xk[None, :], mask=mmask[:, None] & rmask[None, :],
                             other=0.0)
                q = _as_float((words >> (j * BITS)) & MASK, xj.dtype, FP16_MAGIC)
                p = tl.dot(xj, q, p)
                xsum += tl.sum(xj.to(tl.float32), axis=1)
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < k_hi
            rows = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
            wp = qw_ptr + (rows * RGW).to(tl.int64)[:, None, None] * N + cols[None, None, :]
            # loaded 3-D [BLOCK_R, 1, BLOCK_N] so that the unpacked tile keeps the load's layout (4 columns a
            # thread): a 2-D load broadcast to 3-D got one column a thread, hence scalar cvt and shared stores
            wmask = (rows * PACK < k_hi)[:, None, None] & cmask[None, None, :]
            words = tl.load(wp, mask=wmask, other=0)
            xk = ks
            if HAS_PERM:
                xk = tl.load(perm_ptr + ks, mask=kmask, other=0)
            xt = tl.load(x_ptr + ms[:, None] * stride_xm + xk[None, :], mask=mmask[:, None] & kmask[None, :],
                         other=0.0)  # [BLOCK_M, BLOCK_K] in x's dtype
            pos = tl.arange(0, PACK) * BITS
            if RGW == 1:
                codes = (words >> pos[None, :, None]) & MASK  # [BLOCK_R, PACK, BLOCK_N]; mask drops sign bits
            else:  # 6-bit: code j in word pos // 32 of the row-group at bit pos % 32, and the next word's low bits
                w1 = tl.load(wp + N, mask=wmask, other=0).to(tl.uint32, bitcast=True)
                w2 = tl.load(wp + 2 * N, mask=wmask, other=0).to(tl.uint32, bitcast=True)
                w0 = words.to(tl.uint32, bitcast=True)
                wi = (pos // 32)[None, :, None]
                sh = (pos % 32).to(tl.uint32)[None, :, None]
                lo = tl.where(wi == 0, w0, tl.where(wi == 1, w1, w2))
                hi = tl.where(wi == 0, w1, w2)
                codes = stream_code(lo, hi, sh, BITS)
            codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))  # row r * PACK + j: input feature k0 + r * PACK + j
            q = _as_float(codes, xt.dtype, FP16_MAGIC)
            p = tl.dot(xt, q)  # [BLOCK_M, BLOCK_N] fp32: sum_k x * code, exact codes
            xsum = tl.sum(xt.to(tl.float32), axis=1)  # [BLOCK_M]
        g = k0 // group_size
        s = tl.load(sc_ptr + g * N + cols, mask=cmask, other=0.0).to(tl.float32)
        zf = tl.load(zf_ptr + (0 if ZROW else g * N) + cols, mask=cmask, other=0.0).to(tl.float32)
        acc += (p - xsum[:, None] * zf[None, :]) * s[None, :]
    pdl.release(PDL)
    splitk.finish(acc, y_ptr, part_ptr, cnt_ptr, ms[:, None] * N + cols[None, :], mmask[:, None] & cmask[None, :],
                  pid_n, pid_k, tl.num_programs(1), M * N, S_CHUNK)


def mma_block_k(bits: int, group_size: int, in_features: int, target: int = 128) -> int | None:
    """BLOCK_K: a power of two in [16, target] dividing the group (tiles never straddle a group), or
    None where this kernel cannot serve the layer (bits not in MMA_BITS, or groups under 16 rows)."""
    if bits not in MMA_BITS:
        return None
    gs = in_features if gptq_groups(in_features, group_size) == 1 else group_size
    block_k = 16
    if gs % block_k:
        return None
    while block_k * 2 <= target and gs % (block_k * 2) == 0:
        block_k *= 2
    return block_k


def mma_launch_params(n: int, k: int, m: int, bits: int, block_k: int, *, block_n: int | None = None,
                      split: int | None = None, num_warps: int | None = None,
                      num_stages: int | None = None) -> dict[str, int]:
    """BLOCK_M / BLOCK_N / split / num_warps / num_stages for one shape (overrides: the benchmark's sweep).

    Up to WORDS_MAX_M rows (and word tiles of 16+ rows) the WORDS form: BLOCK_N WORDS_BLOCK_N, split to
    about TARGET_PROGRAMS programs. Otherwise split-K is capped so the fp32 partials stay a small fraction of
    the packed bytes (at M = 64 and K = 4096 that means no split); BLOCK_N is the widest of 128 / 64 / 32 that
    still gives about TARGET_PROGRAMS / 2 programs with that split, so small-N layers still spread over the SMs.
    """
    block_m = max(16, triton.next_power_of_2(m))
    tiles = triton.cdiv(k, block_k)
    # a word tile of >= 16 rows: one mma K step (codes within a word only)
    words = m <= WORDS_MAX_M and 32 % bits == 0 and block_k // (32 // bits) >= 16
    max_split = tiles if words else max(1, min(tiles, int(MAX_PARTIAL_FRACTION * k * bits / (64 * m))))
    if block_n is None and words:
        block_n = WORDS_WIDE_BLOCK_N if n >= WORDS_WIDE_N else WORDS_BLOCK_N
    if block_n is None:
        block_n = 32
        for bn in (128, 64):
            if triton.cdiv(n, bn) * max_split >= TARGET_PROGRAMS // 2:
                block_n = bn
                break
    n_blocks = triton.cdiv(n, block_n)
    if split is None:
        split = min(max_split, max(1, triton.cdiv(TARGET_PROGRAMS, n_blocks)))
    split = max(1, min(tiles, split))
    k_per_split = triton.cdiv(tiles, split) * block_k
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "split": triton.cdiv(k, k_per_split),
            "k_per_split": k_per_split, "num_warps": num_warps or 4, "num_stages": num_stages or 3, "WORDS": words}


def gptq_mma(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
             perm: torch.Tensor | None, bits: int, group_size: int, block_k: int, *,
             block_n: int | None = None, split: int | None = None, num_warps: int | None = None,
             num_stages: int | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W.T for fp16 / bf16 x with unit stride along K (meant for M <= MMA_MAX_M).

    The operands are the GEMV's (`gptq.gptq_gemv`): qweight with contiguous groups (stored, or
    `sort_act_order`'s output with its perm), zeros `float_zeros`, scales fp16 (an int16 view is
    accepted); block_k is `mma_block_k`. The keyword overrides go to `mma_launch_params`.
    """
    m, k = x.shape
    n = qweight.shape[1]
    assert x.dtype in (torch.float16, torch.bfloat16) and x.stride(1) == 1, (x.dtype, x.stride())
    p = mma_launch_params(n, k, m, bits, block_k, block_n=block_n, split=split, num_warps=num_warps,
                          num_stages=num_stages)
    gs = k if gptq_groups(k, group_size) == 1 else group_size
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    split = p["split"]
    grid = (triton.cdiv(n, p["BLOCK_N"]), split)
    gptq_mma_kernel[grid](x, qweight, zeros, scales.view(torch.float16), x if perm is None else perm, y,
                          splitk.workspace(split, m, n, x.device), splitk.counters(x.device, grid[0]),
                          m, n, k, p["k_per_split"], gs, x.stride(0),
                          BITS=bits, BLOCK_M=p["BLOCK_M"], BLOCK_N=p["BLOCK_N"], BLOCK_K=p["BLOCK_K"],
                          HAS_PERM=perm is not None,
                          S_CHUNK=splitk.chunk(p["BLOCK_M"] * p["BLOCK_N"] // (32 * p["num_warps"])),
                          FP16_MAGIC=x.dtype == torch.float16 or bits <= 4, WORDS=p["WORDS"],
                          ZROW=zero_row(zeros, k, group_size), num_warps=p["num_warps"], num_stages=p["num_stages"],
                          **pdl.launch(x.device, m))
    return y
