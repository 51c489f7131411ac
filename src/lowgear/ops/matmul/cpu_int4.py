"""4-bit layers on a CPU, kept at 4 bits: torch's int4 weight-only matmul (`aten._weight_int4pack_mm_for_cpu`).

A CPU decode step is bound by the bytes it reads: unpacked to float32, a 4-bit layer reads 8x its file
size every step. torch's CPU kernel reads 4-bit codes with a (scale, zero) per group of 32 to 256
weights along K and dequantizes in registers:

    w[n, k] = (code[n, k] - 8) * scale[g, n] + zero[g, n]        g = k // group

Every GGUF type whose codes are 4-bit is that, per group of 32 (`repack.parts`: w = code * scale -
offset, so zero = 8 * scale - offset): Q4_0, Q4_1 and Q4_K. The kernel takes bfloat16 activations (its
float32 form runs 20-30x slower), so inside these matmuls x and the group's scale and zero are rounded
to bfloat16 (2**-9 relative); the codes are exact and the sums are float32. why:
docs/decisions/022-cpu-int4-weights.md

`hold(module)` converts one packed QuantLinear in place (its `qweight` becomes the kernel's packed
codes, `i4_scales_zeros` [groups, N, 2] the bfloat16 scale and zero); `matmul` is the kernel hook.
"""

from __future__ import annotations

import functools

import torch

from ...formats.blocks import get_format
from . import repack

TYPES = ("Q4_0", "Q4_1", "Q4_K")  # GGUF types with 4-bit codes (repack.parts gives their codes and groups)
GROUP = 32


@functools.cache
def available() -> bool:
    """Whether this torch has the int4 CPU kernel and it computes a known product (one tiny call)."""
    if not (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")):
        return False
    try:
        codes = torch.arange(64 * 64, dtype=torch.int32).reshape(64, 64) % 16
        scale = torch.full((64, 2), 0.5)
        offset = torch.full((64, 2), 1.0)
        packed, sz = pack(codes, scale, offset)
        x = torch.ones(1, 64)
        y = matmul_parts(x, packed, sz, 64)
        want = (codes.float() * 0.5 - 1.0).sum(1)
        return bool(torch.allclose(y[0], want, rtol=1e-2, atol=1e-2))
    except (RuntimeError, NotImplementedError):
        return False


def can_hold(qtype: str, out_features: int, in_features: int) -> bool:
    """Whether a packed layer of this type and shape can be held for the int4 kernel."""
    # the packer takes N in multiples of 16
    return qtype in TYPES and in_features % get_format(qtype).block_size == 0 and out_features % 16 == 0


def pack(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes int32 [N, K] in 0..15, scale / offset float32 [N, K / GROUP] (w = code * scale - offset) ->
    (the kernel's packed codes, bfloat16 [K / GROUP, N, 2] scale and zero)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    zero = 8.0 * scale - offset
    sz = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, sz


def convert(qtype: str, data: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF rows [N, row_bytes] of a TYPES layer -> `pack`'s (packed codes, scales and zeros)."""
    codes, scale, offset = repack.parts(qtype, data, in_features)
    return pack(codes, scale, offset)


def matmul_parts(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype, through the int4 kernel in bfloat16."""
    lead = x.shape[:-1]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), packed, GROUP, sz)
    return y.to(x.dtype).reshape(*lead, out_features)


def matmul(x: torch.Tensor, module) -> torch.Tensor:
    """The QuantLinear kernel hook of a layer `hold` converted."""
    return matmul_parts(x, module.qweight, module.i4_scales_zeros.view(torch.bfloat16), module.out_features)


def int4_bytes(qtype: str, shape: tuple[int, ...]) -> int | None:
    """Bytes a layer held for the kernel takes (half a byte a weight, a bfloat16 scale and zero a group), or
    None where it cannot be held (placement.cpu_weights' question)."""
    if len(shape) != 2 or not can_hold(qtype, *shape):
        return None
    n, k = shape
    return n * k // 2 + (k // GROUP) * n * 4


def sizer():
    """`int4_bytes` where this torch's int4 CPU kernel runs, else None (what placement.cpu_weights takes)."""
    return int4_bytes if available() else None


def hold(module) -> bool:
    """Convert a packed QuantLinear on a CPU in place for the kernel, if its type and shape allow; whether it did."""
    if not (module.packed and module._gptq is None and module._exl2 is None and not module.int4_cpu
            and module.device.type == "cpu" and can_hold(module.qtype, module.out_features, module.in_features)):
        return False
    module.hold_int4_cpu(*convert(module.qtype, module.qweight, module.in_features), matmul)
    return True
