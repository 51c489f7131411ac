"""SwiGLU's gate: silu(gate) * up from the fused gate|up output, as one Triton kernel.

In eager torch `silu(gate) * up` is two kernels and a temporary; in a decode step that is one more
launch per layer for a few kilobytes of work. `silu_mul_triton` reads the gate|up rows [T, 2I] once and
writes [T, I]. It rounds as the torch expression does (silu in float32, rounded to the activation
dtype, then the product in float32, rounded), so the CUDA step and the torch path agree to within
the last bit of float32's exp. `silu_mul_ref` is the torch op.

Gemma's GeGLU is the same kernel with GELU (tanh approximation) for silu: `gelu_mul_triton` /
`gelu_mul_ref`. The kernel writes 0.5 g (1 + tanh(z)) as g / (1 + e^(-2z)), the same function
(1 + tanh(z) = 2 / (1 + e^(-2z))) without tanh's cancellation near -1.
"""

from __future__ import annotations

import torch

from . import pdl
from .norm import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def silu_mul_kernel(x_ptr, out_ptr, I, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr,
                       GELU: tl.constexpr = False):
        pdl.wait(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
        ty = out_ptr.dtype.element_ty
        if GELU:  # tanh-approximated GELU: z = sqrt(2 / pi) * (g + 0.044715 g^3)
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            a = g / (1.0 + tl.exp(-2.0 * z))
        else:
            a = g / (1.0 + tl.exp(-g))
        y = a.to(ty).to(tl.float32) * u
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def gelu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def gelu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2I] -> gelu_tanh(gate) * up [..., I] (GeGLU), as silu_mul_triton."""
    return silu_mul_triton(gate_up, gelu=True)


def silu_mul_triton(gate_up: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """gate_up [..., 2I] (gate first, unit stride along the last dim) -> silu(gate) * up [..., I]."""
    two_i = gate_up.shape[-1]
    x2 = gate_up.reshape(-1, two_i)
    assert x2.stride(-1) == 1 and two_i % 2 == 0
    inter = two_i // 2
    out = torch.empty((x2.shape[0], inter), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inter))
    if x2.shape[0]:
        silu_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](x2, out, inter, x2.stride(0), out.stride(0),
                                                                 BLOCK=block, GELU=gelu, num_warps=4,
                                                                 **pdl.launch(gate_up.device, x2.shape[0]))
    return out.view(*gate_up.shape[:-1], inter)
