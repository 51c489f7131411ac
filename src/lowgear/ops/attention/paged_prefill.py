"""Paged prefill attention: causal, variable-length batches, read entirely from the paged cache.

The step's new keys and values are already in the cache (`write_kv` runs first), so a sequence's
new queries attend to its cached prefix and its new tokens alike, through its block table.
Program (query block, sequence, head) holds BLOCK_M queries of one head and walks key blocks of
BLOCK_N positions from the window's start up to its last query's position, with an online softmax
(FlashAttention's recurrence, in the log2 domain). Mixed batches are fine: a decode sequence is a
query block with one valid row.

An 8- or 4-bit cache (ops/kv_write.QuantizedKV) is read as its codes and per-token-per-head scales
and dequantized in the kernel: int8 by a multiply, float8 e4m3 from its bits with integer ops (so
GPUs without FP8 instructions, and the interpreter, read it too), int4 from its byte's nibble
(`dequantize` and `kv_operands`, shared with the decode kernel).

This is the compute-bound path and uses `tl.dot`. Triton compiles `tl.dot` to tensor-core `mma`
only on sm_80+; on sm_70/sm_75 it becomes plain FMAs, so there prefill should go to sdpa (the
backend says so through `TritonBackend.prefers_sdpa_prefill_below_sm80`). fp32 inputs use IEEE
precision in `tl.dot`, not TF32, so the fp32 path agrees with the reference to fp32 accuracy.
SOFTCAP soft-caps the scores as the decode kernel does (its `softcapped`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _LOG2E, NO_WINDOW, dequantize, kv_operands, softcapped  # noqa: F401

INTERPRETED = False  # set below, from what @triton.jit returned

# "No window" is a window longer than any context, so the kernels need no branch for it.


@triton.jit
def _prefill_block(
    q, q_pos, m_ok, m_i, l_i, acc, n0, hi, window, scale_log2, softcap_log2, table, k_base, v_base,
    stride_kp, stride_kt, stride_vp, stride_vt, offs_n, offs_d, d_ok,
    ks_base, vs_base, stride_sp, stride_st, offs_c, shift,
    PAGE_SIZE: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr, QUANT: tl.constexpr,
):  # fmt: skip
    """One block of key positions n0.. (< hi): update the online softmax state (m_i, l_i, acc).

    The kernel runs this body from a `for` loop when compiled and from a `while` loop when
    interpreted: Triton 3.6's interpreter holds scalars as 1-element arrays, which NumPy >= 2.4
    refuses to turn into the Python ints a runtime-bounded `range` needs.
    """
    k_pos = n0 + offs_n
    n_ok = k_pos < hi
    page = tl.load(table + k_pos // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
    slot = k_pos % PAGE_SIZE
    # K loaded transposed, [HEAD_DIM_P, BLOCK_N], so the score tile is one plain dot.
    k_t = tl.load(
        k_base + page[None, :] * stride_kp + slot[None, :] * stride_kt + offs_c[:, None],
        mask=n_ok[None, :] & d_ok[:, None],
        other=0,
    )
    if QUANT != 0:
        ks = tl.load(ks_base + page * stride_sp + slot * stride_st, mask=n_ok, other=0.0)
        k_t = (dequantize(k_t, shift[:, None], QUANT) * ks[None, :]).to(q.dtype)
    if IEEE:
        s = tl.dot(q, k_t, input_precision="ieee")
    else:
        s = tl.dot(q, k_t)
    s = s * scale_log2  # [BLOCK_M, BLOCK_N]
    if SOFTCAP:
        s = softcapped(s, softcap_log2)
    see = m_ok[:, None] & n_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
    see = see & (k_pos[None, :] > q_pos[:, None] - window)
    s = tl.where(see, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row that has seen nothing yet keeps m = -inf; subtract 0 instead so no NaN appears.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    v = tl.load(
        v_base + page[:, None] * stride_vp + slot[:, None] * stride_vt + offs_c[None, :],
        mask=n_ok[:, None] & d_ok[None, :],
        other=0,
    )
    if QUANT != 0:
        vs = tl.load(vs_base + page * stride_sp + slot * stride_st, mask=n_ok, other=0.0)
        v = (dequantize(v, shift[None, :], QUANT) * vs[:, None]).to(q.dtype)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + pv


# stride_bt (the block table's width) is not specialised on, as in paged_decode_kernel (which says why)
@triton.jit(do_not_specialize=["stride_bt"])
def paged_prefill_kernel(
    q_ptr,  # [T, H, D]
    k_cache_ptr,  # [pages, PAGE_SIZE, KVH, D]
    v_cache_ptr,
    k_scale_ptr,  # [pages, PAGE_SIZE, KVH] float32 of an 8-bit cache (QUANT > 0; else unread)
    v_scale_ptr,
    block_tables_ptr,  # [B, max_pages] int32
    cu_q_lens_ptr,  # [B+1] int32
    kv_lens_ptr,  # [B] int32
    out_ptr,  # [T, H, D]
    scale_log2,  # softmax scale * log2(e)
    window,  # sliding window in positions (NO_WINDOW for none)
    softcap_log2,  # attention soft-cap * log2(e), read when SOFTCAP
    stride_qt,
    stride_qh,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_vp,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_sp,  # the scales' page and token strides (their head stride is 1)
    stride_st,
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products in tl.dot
    WHILE_LOOP: tl.constexpr,  # the interpreter's form of the loop (see _prefill_block)
    SOFTCAP: tl.constexpr = False,  # scores soft-capped (softcap_log2)
    QUANT: tl.constexpr = 0,  # 0: K/V in a float dtype; 1: int8 codes; 2: float8 e4m3 bytes; 3: int4, two a byte
):
    block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP

    q_start = tl.load(cu_q_lens_ptr + seq)
    q_len = tl.load(cu_q_lens_ptr + seq + 1) - q_start
    if block * BLOCK_M >= q_len:
        return
    kv_len = tl.load(kv_lens_ptr + seq)
    first = kv_len - q_len  # position of the sequence's first new token

    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_P)
    m_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    q_pos = first + offs_m  # [BLOCK_M]

    q = tl.load(
        q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    # Keys this block can see: from the window start of its first query to its last query.
    hi = first + tl.minimum((block + 1) * BLOCK_M, q_len)
    lo = tl.maximum(first + block * BLOCK_M - window + 1, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)

    table = block_tables_ptr + seq * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    ks_base = k_scale_ptr + kv_head
    offs_c = offs_d // 2 if QUANT == 3 else offs_d  # the byte holding element d
    shift = (offs_d % 2) * 4  # (int4) its nibble
    vs_base = v_scale_ptr + kv_head
    if WHILE_LOOP:
        n0 = lo
        while n0 < hi:
            m_i, l_i, acc = _prefill_block(
                q, q_pos, m_ok, m_i, l_i, acc, n0, hi, window, scale_log2, softcap_log2, table, k_base, v_base,
                stride_kp, stride_kt, stride_vp, stride_vt, offs_n, offs_d, d_ok,
                ks_base, vs_base, stride_sp, stride_st, offs_c, shift, PAGE_SIZE, IEEE, SOFTCAP, QUANT,
            )  # fmt: skip
            n0 += BLOCK_N
    else:
        for n0 in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _prefill_block(
                q, q_pos, m_ok, m_i, l_i, acc, n0, hi, window, scale_log2, softcap_log2, table, k_base, v_base,
                stride_kp, stride_kt, stride_vp, stride_vt, offs_n, offs_d, d_ok,
                ks_base, vs_base, stride_sp, stride_st, offs_c, shift, PAGE_SIZE, IEEE, SOFTCAP, QUANT,
            )  # fmt: skip

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )


INTERPRETED = type(paged_prefill_kernel).__name__ == "InterpretedFunction"


def blocks_for(head_dim: int, interpreted: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): 64x64 tiles for head_dim <= 64, 64x32 to 128, 32x16 above (Gemma's 256).

    Each fits sm_75's 64 KiB of shared memory a block: compiled for sm_75 in fp16, head_dim 256 takes
    96 KiB at 64x32, 64 KiB at 32x32 (the limit, with nothing to spare) and 48 KiB at 32x16.
    why: docs/decisions/015-gemma-prefill-tiles-head-dim-256.md
    """
    if interpreted:
        return 32, 32
    return (64, 64) if head_dim <= 64 else (64, 32) if head_dim <= 128 else (32, 16)


def paged_prefill(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [pages, page_size, KVH, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_pages] int32
    cu_q_lens: torch.Tensor,  # [B+1] int32
    kv_lens: torch.Tensor,  # [B] int32, including this step's tokens
    scale: float,
    max_q_len: int,
    window: int | None = None,
    out: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of every new token over its sequence's cache; `max_q_len` is host-side.

    The caches may be ops/kv_write.QuantizedKV (8-bit pages, dequantized in the kernel)."""
    tokens, heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_cache.shape
    quant, k_cache, v_cache, k_scale, v_scale, scale_strides = kv_operands(k_cache, v_cache)
    compute = q.dtype if quant else k_cache.dtype
    assert heads % kv_heads == 0, "query heads must be a multiple of kv heads"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and q.stride(-1) == 1
    if out is None:
        out = torch.empty_like(q)
    if q.dtype != compute:
        q = q.to(compute)  # tl.dot needs both operands in one dtype
    batch = cu_q_lens.shape[0] - 1
    if tokens == 0 or batch == 0:
        return out
    block_m, block_n = blocks_for(head_dim, INTERPRETED)
    paged_prefill_kernel[(triton.cdiv(max_q_len, block_m), batch, heads)](
        q, k_cache, v_cache, k_scale, v_scale,
        block_tables, cu_q_lens, kv_lens, out,
        scale * _LOG2E, window or NO_WINDOW, (softcap or 1.0) * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        *scale_strides,
        GROUP=heads // kv_heads,
        HEAD_DIM=head_dim, HEAD_DIM_P=max(16, triton.next_power_of_2(head_dim)),
        PAGE_SIZE=page_size, BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=compute == torch.float32, WHILE_LOOP=INTERPRETED, SOFTCAP=bool(softcap), QUANT=quant,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return out
