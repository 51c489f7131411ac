"""RMSNorm fused with the residual add, as one Triton kernel, with the torch path beside it.

Between sublayers a decoder does `h = h + sublayer_out; x = rms_norm(h)`: two reads of h and two
kernel launches in eager torch. `rms_norm_triton(x, weight, eps, residual)` does both in one pass per row:
it adds x into `residual` in place (the new residual stream, rounded to its dtype as the unfused
code would) and returns the normalized row. `rms_norm_torch` is the same contract in torch;
`rms_norm_ref` the same math without the in-place write (tests' float64 reference). Which one a
device runs is ops/dispatch.py's decision, not this module's.
"""

from __future__ import annotations

import torch

from . import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: ops/dispatch.py then gives every device the torch ops
    triton = None


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32):
    """Torch RMSNorm; with `residual`, returns (normed, x + residual) and mutates nothing."""
    if residual is not None:
        h = (x.to(compute_dtype) + residual.to(compute_dtype)).to(residual.dtype)
        return rms_norm_ref(h, weight, eps, None, compute_dtype).to(x.dtype), h
    xf = x.to(compute_dtype)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.to(compute_dtype)).to(x.dtype)


if triton is not None:

    @triton.jit
    def rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, H, stride_x, stride_r, stride_o, eps,
                        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # a weight: loaded before the wait
        pdl.wait(PDL)
        h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r_ptrs = r_ptr + row * stride_r + cols
            h = h + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
            h = h.to(r_ptr.dtype.element_ty)  # the residual stream keeps its dtype's rounding
            tl.store(r_ptrs, h, mask=mask)
            h = h.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / H + eps)
        tl.store(out_ptr + row * stride_o + cols, (h * inv * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """The torch op, with rms_norm_triton's contract: with `residual`, residual += x in place and
    returns (normed residual, residual); without it, returns normed x. float32 rows take torch's own
    rms_norm (one op, the reference's math in float32: on a CPU the per-op cost is what a small model's
    step is made of); other dtypes compute in float32 as the reference does."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or (residual is not None and residual.dtype != torch.float32):
        if residual is None:
            return rms_norm_ref(x, weight, eps)
        out, h = rms_norm_ref(x, weight, eps, residual)
        residual.copy_(h)
        return out, residual
    if residual is None:
        return torch.nn.functional.rms_norm(x, weight.shape, weight, eps)
    residual.add_(x)
    return torch.nn.functional.rms_norm(residual, weight.shape, weight, eps), residual


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm over the last dim of x [..., H] in one kernel launch.

    Without `residual`: returns normed x. With it: residual += x in place, returns
    (normed residual, residual). x and residual must have unit stride along H.
    """
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    r2 = residual.view(-1, hidden) if residual is not None else x2
    assert x2.stride(-1) == 1 and r2.stride(-1) == 1 and weight.is_contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(hidden)
    warps = 8 if block >= 4096 else 4 if block >= 1024 else 2
    if x2.shape[0]:
        rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, hidden, x2.stride(0), r2.stride(0),
                                        out.stride(0), eps, HAS_RESIDUAL=residual is not None,
                                        BLOCK=block, num_warps=warps, **pdl.launch(x.device, x2.shape[0]))
    out = out.view(x.shape)
    return out if residual is None else (out, residual)
