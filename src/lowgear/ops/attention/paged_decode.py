"""Paged decode attention (one new token per sequence), flash-decoding style.

Decode is memory-bound: each step reads every sequence's K/V once. With few sequences and long
contexts, one program per (sequence, kv-head) leaves most SMs idle, so the context is cut into
`num_splits` chunks (split-K). Program (sequence, kv_head, split) serves *all* query heads of its
kv-head group, so each K/V row is read once per group, keeps an online softmax over its chunk
(pages reached through the block table) and writes a partial output plus its log-sum-exp; a small
reduce kernel then combines the splits by their log-sum-exp weights. With one split the first
kernel writes the output directly and the reduce is skipped.

The scores and the weighted sum of values are broadcast-multiplies reduced with `tl.sum` (the FMA
form): the work is GEMV-shaped (a handful of query rows), and without `tl.dot` the kernel compiles
to the same plain loads and FMAs on sm_70/sm_75 as on newer GPUs. That form spreads head_dim over
a warp's lanes, so each score is a cross-lane sum. The split-D FMA form (paged_decode's split_d)
gives head_dim only a few lanes and the rest of the warp positions, so a score is summed mostly in
a thread (_decode_block says how its layouts are obtained). On sm_80+ with fp16 / bf16 caches the
triton rung runs the DOT form instead: a kv head's query heads (padded to 16 rows) times the
block's keys, and the probabilities times its values, both through tl.dot (tensor cores), blocks
of DOT_BLOCK_N positions, DOT_NUM_WARPS warps a program; the online softmax, the splits and the
reduce are the same. Inputs may be fp16, bf16 or fp32; everything is accumulated in fp32 and scores
live in the log2 domain (exp2).

SOFTCAP (a constexpr: models without it compile unchanged) soft-caps each score before the softmax
(gemma2). QUANT (a constexpr too) reads an 8- or 4-bit cache (ops/kv_write.QuantizedKV) in any form,
decoding codes as each tile loads; paged_decode_kernel says where the scales enter. Both helpers, shared
with the prefill kernel, are in common.py; the splits' combining kernel in decode_reduce.py.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .. import pdl
from .decode_reduce import paged_decode_reduce_kernel
from .common import _LOG2E, NO_WINDOW, QUANT_CODES, dequantize, kv_operands, softcapped  # noqa: F401

INTERPRETED = False  # set below, from what @triton.jit returned

@triton.jit
def _decode_block(
    q, m_i, l_i, acc, n0, end, table, k_base, v_base,
    stride_kp, stride_kt, stride_vp, stride_vt, offs_n, offs_d, d_ok, offs_dk, dk_ok, softcap_log2,
    ks_base, vs_base, stride_sp, stride_st, offs_kc, shift_k, offs_vc, shift_v,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, SPLIT_D: tl.constexpr,
    SOFTCAP: tl.constexpr, QUANT: tl.constexpr,
):  # fmt: skip
    """One block of positions n0.. (< end): update the online softmax state (m_i, l_i, acc).

    The kernels run this body from a `for` loop when compiled and from a `while` loop when
    interpreted: Triton 3.6's interpreter holds scalars as 1-element arrays, which NumPy >= 2.4
    refuses to turn into the Python ints a runtime-bounded `range` needs.

    The split-D FMA form (SPLIT_D > 0) takes q as [GROUP_P, SPLIT_D, D_HI, D_VEC] and loads the keys
    straight into the rank of the score product, [1, SPLIT_D, BLOCK_N, D_HI, D_VEC] (offs_dk / dk_ok:
    each element's head_dim index (hi * SPLIT_D + lo) * D_VEC + e, and its mask). Both shapes are
    chosen for what Triton does with them. Coalescing gives a thread D_VEC contiguous elements (16
    bytes) and, in Triton 3.6, the lanes to the other dims in index order, so SPLIT_D lanes cover
    adjacent 16-byte chunks of a row (a warp's load reads whole 32-byte sectors), the rest of the
    warp takes positions and D_HI stays in-thread. The load's layout then reaches the product
    unchanged, because broadcasts pass a layout on and expand_dims of a non-sliced layout does not:
    had the keys been expanded to rank 5, or q been loaded at rank 5, q's layout (lanes on the query
    heads) or Triton's default (lanes on D_VEC) would have won and moved the keys through shared
    memory. The score sums D_VEC and D_HI in
    the thread, then SPLIT_D lanes (log2(SPLIT_D) shuffle rounds). The values are loaded as
    [1, BLOCK_N, HEAD_DIM_P] for the same reason: their load layout (16 lanes across head_dim, 2
    across positions) becomes the P.V product's, whose sum over positions is then in-thread but for
    one round; left to propagation, the product took the scores' layout (lanes across positions).
    """
    pos = n0 + offs_n
    n_ok = pos < end
    if SPLIT_D > 0:
        if PAGE_SIZE >= BLOCK_N:
            # The block lies in at most two pages: two scalar table reads and a select per position,
            # where a lookup per position costs each thread a load and 64-bit arithmetic per row
            # (why: docs/decisions/008-split-d-decode-attention.md).
            first = n0 // PAGE_SIZE
            page0 = tl.load(table + first).to(tl.int64)
            page1 = tl.load(table + first + 1, mask=(first + 1) * PAGE_SIZE < end, other=0).to(tl.int64)
            in1 = pos >= (first + 1) * PAGE_SIZE
            slot = pos - first * PAGE_SIZE - tl.where(in1, PAGE_SIZE, 0)
            k_page = k_base + page0 * stride_kp
            v_page = v_base + page0 * stride_vp
            k_row = tl.where(in1, (page1 - page0) * stride_kp, 0) + slot * stride_kt
            v_row = tl.where(in1, (page1 - page0) * stride_vp, 0) + slot * stride_vt
            if QUANT != 0:
                page = tl.where(in1, page1, page0)  # (the scales' rows)
        else:
            page = tl.load(table + pos // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
            slot = pos % PAGE_SIZE
            k_page = k_base
            v_page = v_base
            k_row = page * stride_kp + slot * stride_kt
            v_row = page * stride_vp + slot * stride_vt
        k = tl.load(k_page + k_row[None, None, :, None, None] + offs_kc, mask=n_ok[None, None, :, None, None] & dk_ok,
                    other=0.0)  # [1, SPLIT_D, BLOCK_N, D_HI, D_VEC]
        if QUANT != 0:
            k = dequantize(k, shift_k, QUANT)
        s = tl.sum(q[:, :, None, :, :] * k.to(tl.float32), axis=4)  # [GROUP_P, SPLIT_D, BLOCK_N, D_HI], in-thread
        s = tl.sum(tl.sum(s, axis=3), axis=1)  # [GROUP_P, BLOCK_N]: in-thread, then across the SPLIT_D lanes
    else:
        page = tl.load(table + pos // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
        slot = pos % PAGE_SIZE
        k = tl.load(
            k_base + page[:, None] * stride_kp + slot[:, None] * stride_kt + offs_kc[None, :],
            mask=n_ok[:, None] & d_ok[None, :], other=0.0,
        )  # [BLOCK_N, HEAD_DIM_P]
        if QUANT != 0:
            k = dequantize(k, shift_k[None, :], QUANT)
        if DOT:  # q in the cache dtype (quantized: q's), GROUP_P >= 16 rows (the heads past GROUP are zeros)
            s = tl.dot(q, tl.trans(k.to(q.dtype)))  # [GROUP_P, BLOCK_N] fp32
        else:
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)  # [GROUP_P, BLOCK_N]
    if QUANT != 0:
        # A key's scale multiplies its scores (exact codes in the product, one multiply per position).
        scale_row = page * stride_sp + slot * stride_st
        s = s * tl.load(ks_base + scale_row, mask=n_ok, other=0.0)[None, :]
    if SOFTCAP:
        s = softcapped(s, softcap_log2)
    s = tl.where(n_ok[None, :], s, float("-inf"))
    # Every block holds at least one valid position, so m_new is finite from the first block on.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    pv = p  # the weights of the values (an FMA form's quantized values: times their scales)
    if SPLIT_D > 0:
        v = tl.load(
            v_page + v_row[None, :, None] + offs_vc[None, None, :], mask=n_ok[None, :, None] & d_ok[None, None, :],
            other=0.0,
        )  # [1, BLOCK_N, HEAD_DIM_P]
        if QUANT != 0:
            v = dequantize(v, shift_v[None, None, :], QUANT)
            pv = p * tl.load(vs_base + scale_row, mask=n_ok, other=0.0)[None, :]
        acc = acc * alpha[:, None] + tl.sum(pv[:, :, None] * v.to(tl.float32), axis=1)
    else:
        v = tl.load(
            v_base + page[:, None] * stride_vp + slot[:, None] * stride_vt + offs_vc[None, :],
            mask=n_ok[:, None] & d_ok[None, :], other=0.0,
        )
        if QUANT != 0:
            v = dequantize(v, shift_v[None, :], QUANT)
            if DOT:  # the tile in q's dtype, as tl.dot needs (p could not carry the scales: fp16 p * scale underflows)
                v = (v * tl.load(vs_base + scale_row, mask=n_ok, other=0.0)[:, None]).to(q.dtype)
            else:
                pv = p * tl.load(vs_base + scale_row, mask=n_ok, other=0.0)[None, :]
        if DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.sum(pv[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc


# The block table's row stride is its width (the most pages of a sequence in the batch): left to
# Triton's specialisation (an int equal to 1, or a multiple of 16, compiles apart) the first
# prompt past one page would compile the kernel again.
@triton.jit(do_not_specialize=["stride_bt"])
def paged_decode_kernel(
    q_ptr,  # [B, H, D]
    k_cache_ptr,  # [pages, PAGE_SIZE, KVH, D] (QUANT 3: D / 2 bytes)
    v_cache_ptr,
    k_scale_ptr,  # [pages, PAGE_SIZE, KVH] float32 of a quantized cache (QUANT > 0; else unread)
    v_scale_ptr,
    block_tables_ptr,  # [B, max_pages] int32
    kv_lens_ptr,  # [B] int32
    out_ptr,  # [B, H, D], written when DIRECT
    part_o_ptr,  # [B, H, NUM_SPLITS, D] fp32, written otherwise
    part_lse_ptr,  # [B, H, NUM_SPLITS] fp32 (log2 domain)
    scale_log2,  # softmax scale * log2(e)
    window,  # sliding window in positions (NO_WINDOW for none)
    softcap_log2,  # attention soft-cap * log2(e), read when SOFTCAP
    min_split,  # fewest positions a split takes (a multiple of BLOCK_N)
    heads_per_kv,  # query heads per kv head (a multiple of GROUP)
    stride_qb,
    stride_qh,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_vp,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ob,
    stride_oh,
    stride_sp,  # the scales' page and token strides (their head stride is 1)
    stride_st,
    GROUP: tl.constexpr,  # query heads one program serves (all of one kv head's, or a part of them)
    GROUP_P: tl.constexpr,  # GROUP rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DIRECT: tl.constexpr,  # NUM_SPLITS == 1: write the normalised output, no partials
    WHILE_LOOP: tl.constexpr,  # the interpreter's form of the loop (see _decode_block)
    DOT: tl.constexpr,  # scores and values through tl.dot (tensor cores, sm_80+; GROUP_P >= 16)
    PDL: tl.constexpr,  # programmatic dependent launch (pdl.py)
    SPLIT_D: tl.constexpr,  # FMA form: lanes across head_dim in a score (0: all 32; see paged_decode)
    D_VEC: tl.constexpr,  # with SPLIT_D: contiguous head_dim elements a thread loads (16 bytes)
    SOFTCAP: tl.constexpr = False,  # scores soft-capped (softcap_log2)
    QUANT: tl.constexpr = 0,  # 0: K/V in a float dtype; 1: int8 codes; 2: float8 e4m3 bytes; 3: int4, two a byte
):
    """Decode attention for (sequence, head group, split) program_id (0, 1, 2): the FMA form with
    SPLIT_D > 0, else the DOT form or the FMA form that spreads head_dim over the whole warp.

    A quantized cache (QUANT > 0) is read as codes and a float32 scale per token and head, decoded
    by `dequantize` as its tiles are loaded: the FMA forms multiply a key's scores by its scale and
    a value's probabilities by its scale (exact codes in the fp32 products, a multiply per position
    rather than per element); the DOT form puts the codes (exact in fp16 / bf16) through the score
    dot and then scales the scores, and scales the values' tile before the second dot."""
    pdl.wait(PDL)
    seq = tl.program_id(0)
    head0 = tl.program_id(1) * GROUP
    split = tl.program_id(2)
    kv_head = head0 // heads_per_kv

    offs_g = tl.arange(0, GROUP_P)
    offs_d = tl.arange(0, HEAD_DIM_P)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = head0 + offs_g

    kv_len = tl.load(kv_lens_ptr + seq)
    # The one query sits at position kv_len - 1; a window keeps keys at positions > kv_len - 1 - window.
    lo = tl.maximum(kv_len - window, 0)
    # Each sequence cuts its own span into NUM_SPLITS equal runs of whole blocks (at least min_split
    # long): the launch's NUM_SPLITS is fixed by a bound (in a CUDA graph, the cache's capacity),
    # but a short sequence's work is still spread over the splits, and the splits it does not need
    # return at once.
    per_split = ((kv_len - lo + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    per_split = tl.maximum(per_split, min_split)
    start = lo + split * per_split
    end = tl.minimum(start + per_split, kv_len)

    if SPLIT_D > 0:
        # head_dim index d = (hi * SPLIT_D + lo) * D_VEC + e of [SPLIT_D, D_HI, D_VEC] (lo, hi, e)
        D_HI: tl.constexpr = HEAD_DIM_P // (SPLIT_D * D_VEC)
        offs_dq = (tl.arange(0, SPLIT_D)[:, None, None] + tl.arange(0, D_HI)[None, :, None] * SPLIT_D) * D_VEC
        offs_dq += tl.arange(0, D_VEC)[None, None, :]
        q = tl.load(
            q_ptr + seq * stride_qb + heads[:, None, None, None] * stride_qh + offs_dq[None, :, :, :],
            mask=g_ok[:, None, None, None] & (offs_dq < HEAD_DIM)[None, :, :, :],
            other=0.0,
        ).to(tl.float32)  # [GROUP_P, SPLIT_D, D_HI, D_VEC]
        offs_dk = offs_dq[None, :, None, :, :]  # [1, SPLIT_D, 1, D_HI, D_VEC]: the keys' tile
        dk_ok = offs_dk < HEAD_DIM
    else:
        offs_dk = offs_d
        dk_ok = d_ok
        q = tl.load(
            q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=g_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)  # [GROUP_P, HEAD_DIM_P]
    q = q * scale_log2
    if DOT:
        if QUANT != 0:
            q = q.to(q_ptr.dtype.element_ty)  # the codes are converted to it, exactly
        else:
            q = q.to(k_cache_ptr.dtype.element_ty)
    # where a key's and a value's head_dim elements lie: int4 keeps element d in byte d // 2, at bit
    # (d % 2) * 4 (the even element low); the other storages one element an entry (shifts unread)
    offs_kc = offs_dk // 2 if QUANT == 3 else offs_dk
    shift_k = (offs_dk % 2) * 4
    offs_vc = offs_d // 2 if QUANT == 3 else offs_d
    shift_v = (offs_d % 2) * 4

    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, HEAD_DIM_P], tl.float32)

    table = block_tables_ptr + seq * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    ks_base = k_scale_ptr + kv_head
    vs_base = v_scale_ptr + kv_head
    if WHILE_LOOP:
        n0 = start
        while n0 < end:
            m_i, l_i, acc = _decode_block(
                q, m_i, l_i, acc, n0, end, table, k_base, v_base,
                stride_kp, stride_kt, stride_vp, stride_vt, offs_n, offs_d, d_ok, offs_dk, dk_ok, softcap_log2,
                ks_base, vs_base, stride_sp, stride_st, offs_kc, shift_k, offs_vc, shift_v,
                PAGE_SIZE, BLOCK_N, DOT, SPLIT_D, SOFTCAP, QUANT,
            )  # fmt: skip
            n0 += BLOCK_N
    else:
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = _decode_block(
                q, m_i, l_i, acc, n0, end, table, k_base, v_base,
                stride_kp, stride_kt, stride_vp, stride_vt, offs_n, offs_d, d_ok, offs_dk, dk_ok, softcap_log2,
                ks_base, vs_base, stride_sp, stride_st, offs_kc, shift_k, offs_vc, shift_v,
                PAGE_SIZE, BLOCK_N, DOT, SPLIT_D, SOFTCAP, QUANT,
            )  # fmt: skip

    has = l_i > 0.0  # False only for a split that lies past the end of a short sequence
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if DIRECT:
        tl.store(
            out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=g_ok[:, None] & d_ok[None, :],
        )
    else:
        row = (seq * (GROUP * tl.num_programs(1)) + heads) * NUM_SPLITS + split  # [GROUP_P]
        # An empty split writes only its -inf log-sum-exp; the reduce reads no output for it.
        o_mask = (g_ok & has)[:, None] & d_ok[None, :]
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=o_mask)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_ok)


INTERPRETED = type(paged_decode_kernel).__name__ == "InterpretedFunction"


# Fewest positions a split takes (rounded up to whole blocks). Splits are cut from each sequence's
# own length, so a short sequence under a long bound (a CUDA graph's) spreads over many short splits.
MIN_SPLIT = 16
# Warps per program: a one-warp program reduces scores and values without crossing warps.
# why (both): docs/decisions/008-split-d-decode-attention.md
NUM_WARPS = 1


# The tl.dot form (sm_80+, fp16 / bf16): positions per loop step, warps per program, and programs per
# SM a launch aims for; one per SM for a single sequence (fewer splits leave the reduce fewer
# partials to read). why: docs/decisions/009-dot-decode-programs-per-sm.md
DOT_BLOCK_N = 64
DOT_NUM_WARPS = 4
DOT_PROGRAMS_PER_SM = 2
DOT_PROGRAMS_PER_SM_ONE_SEQUENCE = 1


def dot_programs_per_sm(batch: int) -> int:
    """Programs per SM the DOT form's launch aims for, for a decode batch of `batch` sequences."""
    return DOT_PROGRAMS_PER_SM_ONE_SEQUENCE if batch == 1 else DOT_PROGRAMS_PER_SM


# The FMA form's launch (`paged_decode`'s split_d; what sm_70 / sm_75 and fp32 caches run): lanes
# across head_dim in a score, positions per loop step, one-warp programs per SM a launch aims for;
# then the whole-warp form's (split_d 0, blocks from `block_n_for`), and the Triton versions whose
# layouts the split-D form was checked on (its shapes steer Triton's coalescing, _decode_block;
# other versions default to the whole-warp form). why: docs/decisions/008-split-d-decode-attention.md
FMA_SPLIT_D = 4
FMA_BLOCK_N = 16
FMA_PROGRAMS_PER_SM = 4
WHOLE_WARP_PROGRAMS_PER_SM = 16
SPLIT_D_TRITON_VERSIONS = ((3, 6),)


@functools.cache
def triton_version() -> tuple[int, int]:
    """(major, minor) of the Triton in use (read once: every decode launch asks `fma_form`)."""
    return tuple(int(v) for v in triton.__version__.split(".")[:2])


def fma_form() -> tuple[int, int]:
    """(split_d, programs per SM) of the FMA form `paged_decode` launches by default with this Triton."""
    if triton_version() in SPLIT_D_TRITON_VERSIONS:
        return FMA_SPLIT_D, FMA_PROGRAMS_PER_SM
    return 0, WHOLE_WARP_PROGRAMS_PER_SM


def block_n_for(group: int, head_dim: int, programs: int = 0) -> int:
    """Positions per loop step of the whole-warp FMA form (split_d 0), for a launch of `programs`
    (sequence, head-group) pairs per split: 16 for small launches, 32 otherwise
    (why: docs/decisions/008-split-d-decode-attention.md).
    """
    return 16 if programs < 64 else 32


def choose_splits(batch: int, kv_heads: int, max_kv_len: int, block_n: int, target_programs: int,
                  min_split: int = MIN_SPLIT) -> int:
    """How many splits fill `target_programs` programs without splits shorter than `min_split` positions.

    `kv_heads` counts the programs per sequence (kv heads, times the programs each one's group is cut into).
    """
    if batch * kv_heads >= target_programs:
        return 1
    wanted = math.ceil(target_programs / (batch * kv_heads))
    most = max(1, math.ceil(max_kv_len / max(min_split, block_n)))
    return max(1, min(wanted, most, 64))


def paged_decode(
    q: torch.Tensor,  # [B, H, D], one query per sequence
    k_cache,  # [pages, page_size, KVH, D]: a tensor or an ops/kv_write.QuantizedKV
    v_cache,
    block_tables: torch.Tensor,  # [B, max_pages] int32
    kv_lens: torch.Tensor,  # [B] int32, including this step's token
    scale: float,
    max_kv_len: int,
    window: int | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    target_programs: int = 256,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    heads_per_program: int | None = None,
    min_split: int | None = None,
    num_stages: int | None = None,
    use_dot: bool = False,
    split_d: int | None = None,
) -> torch.Tensor:
    """Decode attention for B sequences; `max_kv_len` is a host-side bound on kv_lens (no sync).

    A fixed `num_splits` (and `max_kv_len`) keeps launch shapes fixed, for CUDA-graph capture; the
    kernel still divides each sequence's real length among the splits. `heads_per_program` (a
    divisor of the GQA group; default the whole group) cuts a kv head's query heads over programs.
    `use_dot` (fp16 / bf16 caches, for sm_80+: see DOT_BLOCK_N and beside it) runs scores and values through
    tl.dot with a kv head's query heads as the rows of the product.

    `split_d` picks the FMA form's lane split (see `_form`). `softcap` soft-caps the scores (cap * tanh(s / cap)).
    Quantized caches (QuantizedKV: int8, fp8_e4m3, int4) are decoded in the kernel (its QUANT), in
    every form; their `dtype` (q's) is the one `use_dot` asks about.
    """
    batch, heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_cache.shape
    compute = k_cache.dtype
    quant, k_cache, v_cache, k_scale, v_scale, scale_strides = kv_operands(k_cache, v_cache)
    assert heads % kv_heads == 0, "query heads must be a multiple of kv heads"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and q.stride(-1) == 1
    group = heads // kv_heads
    per_program = heads_per_program or group
    assert group % per_program == 0, "heads_per_program must divide the query heads per kv head"
    programs = heads // per_program
    block_n, num_warps, split_d = _form(use_dot, compute, head_dim, group, batch * programs, block_n,
                                        num_warps, split_d)
    min_split = triton.cdiv(max(min_split or MIN_SPLIT, block_n), block_n) * block_n
    span = min(max_kv_len, window) if window else max_kv_len
    if num_splits is None:
        num_splits = choose_splits(batch, programs, span, block_n, target_programs, min_split)
    out = torch.empty_like(q) if out is None else out
    direct = num_splits == 1
    part_o, part_lse = _partials(q, out, num_splits)
    head_dim_p = triton.next_power_of_2(head_dim)
    launch = pdl.launch(q.device, batch)
    d_vec = min(16 // k_cache.element_size(), head_dim_p)  # (quantized: 16 codes, bytes or nibbles)
    split_consts = {"SPLIT_D": min(split_d, head_dim_p // d_vec) if split_d else 0, "D_VEC": d_vec}
    paged_decode_kernel[(batch, programs, num_splits)](
        q, k_cache, v_cache, k_scale, v_scale, block_tables, kv_lens, out, part_o, part_lse,
        scale * _LOG2E, window or NO_WINDOW, (softcap or 1.0) * _LOG2E, min_split, group,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        *scale_strides,
        GROUP=per_program, GROUP_P=max(16 if use_dot else 1, triton.next_power_of_2(per_program)),
        HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p,
        PAGE_SIZE=page_size, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, DIRECT=direct, WHILE_LOOP=INTERPRETED, DOT=use_dot, SOFTCAP=bool(softcap),
        QUANT=quant,
        num_warps=num_warps or NUM_WARPS, **({"num_stages": num_stages} if num_stages else {}), **split_consts,
        **launch,
    )  # fmt: skip
    if not direct:
        paged_decode_reduce_kernel[(batch, heads)](
            part_o, part_lse, out, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p,
            NUM_SPLITS=num_splits, NUM_SPLITS_P=triton.next_power_of_2(num_splits),
            num_warps=4, **launch,
        )  # fmt: skip
    return out


def _partials(q: torch.Tensor, out: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The splits' float32 outputs [B, H, splits, D] and log-sum-exps [B, H, splits] (unread with one split)."""
    if num_splits == 1:
        return out, out
    batch, heads, head_dim = q.shape
    return (torch.empty(batch, heads, num_splits, head_dim, dtype=torch.float32, device=q.device),
            torch.empty(batch, heads, num_splits, dtype=torch.float32, device=q.device))


def _form(use_dot: bool, dtype: torch.dtype, head_dim: int, group: int, programs: int, block_n: int | None,
          num_warps: int | None, split_d: int | None) -> tuple[int, int | None, int]:
    """(block_n, num_warps, split_d) of a launch: the tl.dot form's constants, or the FMA form's.

    `split_d` (the FMA form only; default `fma_form()`'s, a power of two up to 32, or 0) is how many
    lanes share head_dim in a score (paged_decode_kernel's SPLIT_D): each thread loads 16 contiguous
    bytes of a key row and the warp's other lanes take further positions, so a score is summed
    mostly in-thread and then over log2(split_d) shuffle rounds. 0 runs the whole-warp form, which
    takes five rounds on every score and leaves every lane holding every score. Each thread holds
    GROUP_P * head_dim / split_d query values (fp32), hence 4 or 8 for head_dim 128. Its launch
    wants its own programs per SM (`fma_form()`'s, for the caller's `target_programs`).
    """
    if use_dot:
        assert dtype in (torch.float16, torch.bfloat16) and head_dim >= 16, (dtype, head_dim)
        return block_n or DOT_BLOCK_N, num_warps or DOT_NUM_WARPS, 0
    if split_d is None:
        split_d = fma_form()[0]
    assert split_d & (split_d - 1) == 0 and split_d <= 32, split_d
    return block_n or (FMA_BLOCK_N if split_d else block_n_for(group, head_dim, programs)), num_warps, split_d
