"""The Triton side of `quant/fusion.py`: a GEMV's input read as RMSNorm(h) or silu(gate) * up.

`row_scale` turns the parts of each row's sum of squares into the norm's 1 / rms (once a tile: a
few dozen floats from L1), `x_values` reads activations at given offsets in the fusion's form,
rounded to the activation dtype as the unfused kernels round them (kernels_norm.py, kernels_act.py).
`x_launch` is the host side: the tensor, strides and constexprs a kernel launch passes for an input
that is a plain x, a `NormIn` or a `GluIn`. The output side (h += y, the tiles' sums of squares)
is `splitk.finish`'s RESIDUAL.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fusion import GluIn, NormIn

PLAIN, NORM, GLU = 0, 1, 2


@triton.jit
def row_scale(xs_ptr, n_xs, ms, mmask, M, K, eps, X_MODE: tl.constexpr, SS_P: tl.constexpr, M_PAD: tl.constexpr):
    """[M_PAD] fp32: 1 / sqrt(mean of squares + eps) per row for NORM (xs_ptr: [n_xs, M] parts), else ones."""
    if X_MODE == 1:
        sp = tl.arange(0, SS_P)
        ss = tl.load(xs_ptr + sp[:, None] * M + ms[None, :], mask=(sp < n_xs)[:, None] & mmask[None, :], other=0.0)
        r = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
    else:
        r = tl.full((M_PAD,), 1.0, tl.float32)
    return r


@triton.jit
def x_values(x_ptr, offs, k, kmask, mask, rstd, xw_ptr, up_off, X_MODE: tl.constexpr):
    """Activations at element offsets offs [M_PAD, KT] (input features k [KT]) as fp32, in x's rounding.

    PLAIN: x itself. NORM: x_ptr is h, and x = h * rstd * weight[k] rounded to h's dtype. GLU: x_ptr
    is gate|up (up at +up_off), and x = silu(gate) rounded, times up, rounded.
    """
    ty = x_ptr.dtype.element_ty
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if X_MODE == 1:
        w = tl.load(xw_ptr + k, mask=kmask, other=0.0)
        v = (v * rstd[:, None] * w[None, :]).to(ty).to(tl.float32)
    elif X_MODE == 2:
        u = tl.load(x_ptr + up_off + offs, mask=mask, other=0.0).to(tl.float32)
        v = ((v / (1.0 + tl.exp(-v))).to(ty).to(tl.float32) * u).to(ty).to(tl.float32)
    return v


def x_launch(x_in: torch.Tensor | NormIn | GluIn, in_features: int) -> dict:
    """What a launch passes for its input: x (the tensor read), stride_xm, X_MODE and the fusion's operands."""
    if isinstance(x_in, NormIn):
        h = x_in.h
        assert h.shape[1] == in_features and h.stride(1) == 1 and x_in.weight.dtype == torch.float32
        assert x_in.ss.dtype == torch.float32 and x_in.ss.is_contiguous() and x_in.ss.shape[1] == h.shape[0]
        parts = x_in.ss.shape[0]
        return {"x": h, "stride_xm": h.stride(0), "X_MODE": NORM, "xw": x_in.weight, "xs": x_in.ss,
                "n_xs": parts, "SS_P": triton.next_power_of_2(parts), "eps": float(x_in.eps), "up_off": 0}
    if isinstance(x_in, GluIn):
        gu = x_in.gate_up
        assert gu.shape[1] == 2 * in_features and gu.stride(1) == 1
        return {"x": gu, "stride_xm": gu.stride(0), "X_MODE": GLU, "xw": gu, "xs": gu, "n_xs": 0, "SS_P": 1,
                "eps": 0.0, "up_off": in_features}
    assert x_in.shape[1] == in_features and x_in.stride(1) == 1
    return {"x": x_in, "stride_xm": x_in.stride(0), "X_MODE": PLAIN, "xw": x_in, "xs": x_in, "n_xs": 0,
            "SS_P": 1, "eps": 0.0, "up_off": 0}
