"""What a decode GEMV can read in place of its input x, and do with its output: the step's glue, fused.

A decoder layer's decode step is, besides its four matmuls, a residual add + RMSNorm before the
attention and before the MLP, and silu(gate) * up between the MLP's matmuls. On the GPU each is a
kernel of a few microseconds of fixed cost over a few kilobytes, and at batch 1 of a 4-bit model
they were ~15% of the step (benchmarks/results/h100-session4/). The packed GEMVs can do that work on
the way in and out instead (`quant/kernels/fusion.py` holds the Triton side):

    NormIn(h, ss, weight, eps)   x = RMSNorm(h) * weight: each program reads its slice of h and the
                                 row's scale from `ss`, the row's sum of squares in parts
    GluIn(gate_up)               x = silu(gate) * up, read from the gate|up GEMV's output
    residual = h                 h += y in place (no y is written); the GEMV returns the new h's
                                 row sums of squares over its column tiles, `ss` [tiles, M] fp32,
                                 which is what the next NormIn reads

so a fused layer is qkv(NormIn) -> RoPE -> attention -> o(residual) -> gate_up(NormIn) ->
down(GluIn, residual). Rounding follows the unfused kernels step by step (y to the activation
dtype, the add, the norm's h * scale * weight, silu then the product); only the order of the
sum of squares differs (tiles, then parts), so results agree with the unfused step to within a
rounding of x now and then. `reference_x` is the same math in torch, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NormIn:
    h: torch.Tensor  # [M, K] the residual stream, complete
    ss: torch.Tensor  # [parts, M] float32: h's row sums of squares over column tiles
    weight: torch.Tensor  # [K] float32, the norm's weight
    eps: float

    @property
    def rows(self) -> int:
        return self.h.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.h.dtype


@dataclass(frozen=True)
class GluIn:
    gate_up: torch.Tensor  # [M, 2K]: gate | up

    @property
    def rows(self) -> int:
        return self.gate_up.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.gate_up.dtype


@dataclass(frozen=True)
class SumSquares:
    """A layer's hand-over when its last GEMV added into h: h is complete, `ss` its row sums of squares."""

    ss: torch.Tensor


def reference_x(x_in: NormIn | GluIn) -> torch.Tensor:
    """The x a fused GEMV reads, in torch ([M, K] in the activation dtype)."""
    if isinstance(x_in, NormIn):
        dtype = x_in.h.dtype
        k = x_in.h.shape[1]
        scale = 1.0 / torch.sqrt(x_in.ss.sum(0) / k + x_in.eps)
        return (x_in.h.float() * scale[:, None] * x_in.weight.float()).to(dtype)
    dtype = x_in.gate_up.dtype
    gate, up = x_in.gate_up.float().chunk(2, dim=-1)
    return ((gate / (1.0 + torch.exp(-gate))).to(dtype).float() * up).to(dtype)


def sum_squares(h: torch.Tensor) -> torch.Tensor:
    """h's row sums of squares as one part, [1, M] float32 (tests; a fused GEMV returns them in tiles)."""
    return h.float().pow(2).sum(-1)[None]
