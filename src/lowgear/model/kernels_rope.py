"""Rotary embeddings applied to q and k in place, in one Triton kernel per step.

The kernel reads each token's position, gathers cos/sin from the precomputed cache
[max_positions, rot_dim / 2] (float32, from rope.cos_sin over all positions) and rotates every q and
k head of that token, so a decode step pays one launch and no [T, rot_dim / 2] temporaries. Both
layouts of `ModelSpec.rope_style` are handled: "neox" pairs element i with i + rot_dim/2,
"interleaved" pairs 2i with 2i + 1. When rot_dim < head_dim the tail of each head is left alone.
`apply_rope_ref` is the torch path (CPU, tests).
"""

from __future__ import annotations

import torch

from .kernels_norm import triton, use_triton

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
    def _rotate_heads(ptr, stride_t, stride_h, t, H, cos, sin,
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr):
        heads = tl.arange(0, BLOCK_H)
        i = tl.arange(0, HALF)
        if INTERLEAVED:
            i1, i2 = 2 * i, 2 * i + 1
        else:
            i1, i2 = i, i + HALF
        base = ptr + t * stride_t + heads[:, None] * stride_h
        mask = (heads < H)[:, None]
        x1 = tl.load(base + i1[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + i2[None, :], mask=mask, other=0.0).to(tl.float32)
        ty = ptr.dtype.element_ty
        tl.store(base + i1[None, :], (x1 * cos - x2 * sin).to(ty), mask=mask)
        tl.store(base + i2[None, :], (x2 * cos + x1 * sin).to(ty), mask=mask)

    @triton.jit
    def rope_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, HQ, HK,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
                    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                    INTERLEAVED: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        i = tl.arange(0, HALF)
        cos = tl.load(cos_ptr + pos * stride_c + i).to(tl.float32)[None, :]
        sin = tl.load(sin_ptr + pos * stride_c + i).to(tl.float32)[None, :]
        _rotate_heads(q_ptr, stride_qt, stride_qh, t, HQ, cos, sin, HALF, BLOCK_HQ, INTERLEAVED)
        _rotate_heads(k_ptr, stride_kt, stride_kh, t, HK, cos, sin, HALF, BLOCK_HK, INTERLEAVED)


def apply_rope_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                sin_cache: torch.Tensor, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place at `positions` [T]; returns (q, k).

    cos_cache / sin_cache: [max_positions, rot_dim / 2], same strides, unit stride along the last dim;
    rot_dim / 2 must be a power of two (every Llama-family head size is). q and k need unit stride
    along D (views of a fused qkv output are fine).
    """
    assert style in ("neox", "interleaved"), style
    half = cos_cache.shape[-1]
    if not use_triton(q) or half & (half - 1):
        q_new, k_new = apply_rope_ref(q, k, positions, cos_cache, sin_cache, style)
        q.copy_(q_new)
        k.copy_(k_new)
        return q, k
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_cache.stride() == sin_cache.stride()
    assert cos_cache.stride(-1) == 1 and 2 * half <= q.shape[-1]
    t = q.shape[0]
    if t:
        rope_kernel[(t,)](q, k, positions, cos_cache, sin_cache, q.shape[1], k.shape[1],
                          q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_cache.stride(0),
                          HALF=half, BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
                          BLOCK_HK=triton.next_power_of_2(k.shape[1]),
                          INTERLEAVED=style == "interleaved", num_warps=4)
    return q, k
