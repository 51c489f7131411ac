"""Rotary embeddings applied to q and k in place, in one Triton kernel per step.

The kernel reads each token's position, gathers cos/sin from the precomputed cache
[max_positions, rot_dim / 2] (float32, from rope.cos_sin over all positions) and rotates every q and
k head of that token, so a decode step pays one launch and no [T, rot_dim / 2] temporaries. Both
layouts of `ModelSpec.rope_style` are handled: "neox" pairs element i with i + rot_dim/2,
"interleaved" pairs 2i with 2i + 1. When rot_dim < head_dim the tail of each head is left alone.
`apply_rope_ref` is the torch math (out of place).

Given the layer's caches (`kv=`), the same launch also writes the token's rotated k and its v into
the cache slot `slot_mapping[t]` (what `ops.kv_write.write_kv` does with two `index_copy`), so a
decode step spends one kernel per layer on RoPE and the cache write instead of three; the caller
then runs the backend's `attend` only. `rope_kv_triton` and `rope_kv_torch` are the two forms of that
op (same contract) that ops/dispatch.py chooses between.
"""

from __future__ import annotations

import torch

from . import pdl
from .kv_write import QuantizedKV, write_kv
from .norm import triton

if triton is not None:
    import triton.language as tl


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str, compute_dtype) -> torch.Tensor:
    half = cos.shape[-1]
    xf = x.to(compute_dtype)
    rot, rest = xf[..., : 2 * half], xf[..., 2 * half:]
    cos, sin = cos[:, None, :].to(compute_dtype), sin[:, None, :].to(compute_dtype)
    if style == "neox":
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1).to(x.dtype)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                   sin_cache: torch.Tensor, style: str, compute_dtype: torch.dtype = torch.float32):
    """Rotated copies of q [T, Hq, D] and k [T, Hk, D]; cos/sin_cache [P, rot_dim/2]."""
    cos, sin = cos_cache[positions.long()], sin_cache[positions.long()]
    return _rotate(q, cos, sin, style, compute_dtype), _rotate(k, cos, sin, style, compute_dtype)


if triton is not None:

    @triton.jit
    def _rotate_heads(ptr, stride_t, stride_h, t, H, cos, sin, cache_ptr, slot,
                      HALF: tl.constexpr, HALF_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
                      BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr, TO_CACHE: tl.constexpr):
        """Rotate H heads of token t in place; with TO_CACHE also store the whole rotated heads at
        cache slot `slot` (rows of H * D elements). HALF_P / D_P: HALF / D rounded up to powers of two."""
        heads = tl.arange(0, BLOCK_H)
        i = tl.arange(0, HALF_P)
        if INTERLEAVED:
            i1, i2 = 2 * i, 2 * i + 1
        else:
            i1, i2 = i, i + HALF
        base = ptr + t * stride_t + heads[:, None] * stride_h
        mask = (heads < H)[:, None] & (i < HALF)[None, :]
        head_mask = (heads < H)[:, None]
        x1 = tl.load(base + i1[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + i2[None, :], mask=mask, other=0.0).to(tl.float32)
        ty = ptr.dtype.element_ty
        y1 = (x1 * cos - x2 * sin).to(ty)
        y2 = (x2 * cos + x1 * sin).to(ty)
        tl.store(base + i1[None, :], y1, mask=mask)
        tl.store(base + i2[None, :], y2, mask=mask)
        if TO_CACHE:
            cty = cache_ptr.dtype.element_ty
            cbase = cache_ptr + slot * (H * D) + heads[:, None] * D
            tl.store(cbase + i1[None, :], y1.to(cty), mask=mask)
            tl.store(cbase + i2[None, :], y2.to(cty), mask=mask)
            if 2 * HALF < D:  # partial rotary: the unrotated tail goes to the cache as it is
                j = 2 * HALF + tl.arange(0, D_P)
                tmask = head_mask & (j < D)[None, :]
                tail = tl.load(base + j[None, :], mask=tmask, other=0.0)
                tl.store(cbase + j[None, :], tail.to(cty), mask=tmask)

    @triton.jit
    def rope_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, HQ, HK,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
                    v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_vt, stride_vh,
                    HALF: tl.constexpr, HALF_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
                    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                    INTERLEAVED: tl.constexpr, TO_CACHE: tl.constexpr, PDL: tl.constexpr):
        pdl.wait(PDL)
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        i = tl.arange(0, HALF_P)
        cos = tl.load(cos_ptr + pos * stride_c + i, mask=i < HALF, other=1.0).to(tl.float32)[None, :]
        sin = tl.load(sin_ptr + pos * stride_c + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
        slot = 0
        if TO_CACHE:
            slot = tl.load(slot_ptr + t).to(tl.int64)
        _rotate_heads(q_ptr, stride_qt, stride_qh, t, HQ, cos, sin, q_ptr, slot, HALF, HALF_P, D, D_P, BLOCK_HQ,
                      INTERLEAVED, False)
        _rotate_heads(k_ptr, stride_kt, stride_kh, t, HK, cos, sin, kc_ptr, slot, HALF, HALF_P, D, D_P, BLOCK_HK,
                      INTERLEAVED, TO_CACHE)
        if TO_CACHE:
            heads = tl.arange(0, BLOCK_HK)
            d = tl.arange(0, D_P)
            vmask = (heads < HK)[:, None] & (d < D)[None, :]
            v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + d[None, :], mask=vmask, other=0.0)
            tl.store(vc_ptr + slot * (HK * D) + heads[:, None] * D + d[None, :], v.to(vc_ptr.dtype.element_ty),
                     mask=vmask)


def rope_kv_torch(q, k, v, positions, cos_cache, sin_cache, style, k_cache, v_cache, slot_mapping) -> None:
    """The torch op: rotate q and k in place (apply_rope_ref's math), then write k and v to the cache (write_kv).

    float32 heads rotate in place with five ops per tensor, q and k as one tensor where they are
    adjacent views of a fused q|k|v output (a CPU step is made of per-op costs); other dtypes go through
    apply_rope_ref's float32 copies."""
    if q.dtype == k.dtype == torch.float32:
        pos = positions.long()
        cos, sin = cos_cache[pos][:, None, :], sin_cache[pos][:, None, :]  # [T, 1, half]
        for x in _adjacent(q, k) or (q, k):
            _rotate_(x, cos, sin, style)
    else:
        q_new, k_new = apply_rope_ref(q, k, positions, cos_cache, sin_cache, style)
        q.copy_(q_new)
        k.copy_(k_new)
    write_kv(k, v, k_cache, v_cache, slot_mapping)


def _adjacent(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor] | None:
    """q [T, Hq, D] and k [T, Hk, D] as one [T, Hq + Hk, D] view where k's heads follow q's in memory."""
    d = q.shape[-1]
    if (q.stride(-1) == k.stride(-1) == 1 and q.stride(1) == k.stride(1) == d and q.stride(0) == k.stride(0)
            and k.data_ptr() == q.data_ptr() + q.shape[1] * d * q.element_size()):
        return (q.as_strided((q.shape[0], q.shape[1] + k.shape[1], d), q.stride()),)
    return None


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> None:
    """x [T, H, D] in place: each pair (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) over the first 2 * half
    dims; pairs are (i, i + half) for neox, (2i, 2i + 1) for interleaved (strided views: no copies)."""
    half = cos.shape[-1]
    if style == "neox":
        x1, x2 = x[..., :half], x[..., half : 2 * half]
    else:
        x1, x2 = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
    x1c = x1.clone()
    x1.mul_(cos).addcmul_(x2, sin, value=-1.0)
    x2.mul_(cos).addcmul_(x1c, sin)


def rope_kv_triton(q, k, v, positions, cos_cache, sin_cache, style, k_cache, v_cache, slot_mapping) -> None:
    """The Triton op: RoPE on q and k in place and the cache write of k and v, in one launch (a quantized
    cache: RoPE in the kernel, the quantizing write in torch)."""
    if isinstance(k_cache, QuantizedKV):
        apply_rope_triton(q, k, positions, cos_cache, sin_cache, style)
        write_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    apply_rope_triton(q, k, positions, cos_cache, sin_cache, style, kv=(v, k_cache, v_cache, slot_mapping))


def apply_rope_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                      sin_cache: torch.Tensor, style: str, kv=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place at `positions` [T]; returns (q, k).

    cos_cache / sin_cache: [max_positions, rot_dim / 2], same strides, unit stride along the last dim;
    any even rot_dim <= D (Phi-3's head of 96, Phi-4-mini's 96 rotated dims of 128: the kernel pads its
    ranges to powers of two and masks). q and k need unit stride
    along D (views of a fused qkv output are fine). kv = (v, k_cache, v_cache, slot_mapping) also
    writes the rotated k and v [T, Hk, D] into contiguous caches [pages, page_size, Hk, D] at the
    flat slots slot_mapping [T], as `ops.kv_write.write_kv` does.
    """
    assert style in ("neox", "interleaved"), style
    half = cos_cache.shape[-1]
    d = q.shape[-1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_cache.stride() == sin_cache.stride()
    assert cos_cache.stride(-1) == 1 and 2 * half <= d
    v, k_cache, v_cache, slots = kv if kv is not None else (k, k, k, positions)
    if kv is not None:
        assert v.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
        assert k_cache.shape[-2:] == v_cache.shape[-2:] == k.shape[-2:], (k_cache.shape, k.shape)
    t = q.shape[0]
    if t:
        rope_kernel[(t,)](q, k, positions, cos_cache, sin_cache, q.shape[1], k.shape[1],
                          q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_cache.stride(0),
                          v, k_cache, v_cache, slots, v.stride(0), v.stride(1),
                          HALF=half, HALF_P=triton.next_power_of_2(half), D=d, D_P=triton.next_power_of_2(d),
                          BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
                          BLOCK_HK=triton.next_power_of_2(k.shape[1]),
                          INTERLEAVED=style == "interleaved", TO_CACHE=kv is not None, num_warps=4,
                          **pdl.launch(q.device, t))
    return q, k
