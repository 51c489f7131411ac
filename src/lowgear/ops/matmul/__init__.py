"""Triton kernels over packed weights (GGUF blocks, GPTQ and EXL2 tensors): decode GEMV and prefill tiles.

The public face is three functions; Triton is imported on first use, so this package imports (and
`supports` answers False) on machines without it.

    supports(qtype)                                     -> bool
    kernel_for(module)                                  -> QuantLinear kernel hook, or None
    float_kernel_for(module)                            -> the same for float16 / bfloat16 weights
    packed_matmul(x, qtype, data, out_features, in_features) -> y = x @ dequant(W).T
    dequantize_tile(qtype, data, row_start, row_stop, dtype) -> dense rows of W

`packed_matmul` runs the GEMV kernel (one launch, no weight copy) for up to MAX_M = 4 activation
rows; past that it dequantizes bands of rows and calls torch.matmul, which is what prefill wants on
every GPU (cuBLAS tensor cores even where Triton has none). GPTQ layers get `gptq.gptq_matmul`
(split-K GEMV for few rows, a tl.dot kernel for batched decode on sm_80+, dequantize +
torch.matmul past those; `gptq.py` says where each takes over and why), EXL2
layers `exl2.exl2_matmul` (the same shape of split-K GEMV over groups of mixed bit widths; `exl2.py`). Kernels
need a CUDA tensor, or the Triton interpreter (TRITON_INTERPRET=1) for CPU tensors in tests.
"""

from __future__ import annotations

import torch

from . import repack
from ...formats.dequant import banded_matmul, dequantize_rows, iq4_table

# GGUF block GEMV up to this many activation rows; past it, dequantized bands through cuBLAS
# why: docs/decisions/004-gemv-row-limits.md
MAX_M = 4
# rows dequantized per band when M > MAX_M: bounds the temporary to ~PREFILL_BAND_ELEMS elements
PREFILL_BAND_ELEMS = 1 << 24


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def supports(qtype: str) -> bool:
    """Whether a packed kernel exists for this GGUF type name ("Q4_K", ... or "F16"/"BF16"/"F32")."""
    if not _triton_available():
        return False
    from .gguf_gemv import supports as _supports

    return _supports(qtype)


def kernel_for(module):
    """The kernel hook (`fn(x, module) -> y`) for a packed QuantLinear, or None to keep its torch path.

    GGUF layers of a type with a GPTQ form (Q4_0, Q8_0, Q5_0, Q6_K, Q4_1, Q5_1, Q4_K, Q5_K) are first
    converted in place to GPTQ tensors (`ops/matmul/repack.py`) and then served as GPTQ layers. For GPTQ layers this also runs the one-time preparation
    (`gptq.prepare`: float zeros, and act-order codes sorted by group), and for EXL2 layers
    `exl2.prepare` (group tables, the permutation, split tables), so call it once the module sits on
    its device.
    """
    if getattr(module, "_exl2", None) is not None:
        if not _triton_available():
            return None
        from .exl2_gemv import exl2_matmul, prepare

        prepare(module)
        return exl2_matmul
    # GGUF types with a GPTQ form (ops/matmul/repack.py) run as GPTQ layers
    # why: docs/decisions/007-q4_0-q8_0-as-gptq.md, docs/decisions/013-gguf-as-gptq.md
    if (getattr(module, "_gptq", None) is None and getattr(module, "_exl2", None) is None and module.packed
            and _triton_available() and repack.can_hold(module.qtype, module.out_features, module.in_features)):
        held = repack.gguf_to_gptq(module.qtype, module.qweight, module.in_features,
                                   repack.six_bit(module.qweight.device))
        if held is not None:
            module.hold_as_gptq(held)
    if getattr(module, "_gptq", None) is not None:
        if not _triton_available():
            return None
        from .gptq_gemv import gptq_matmul, prepare

        prepare(module)
        return gptq_matmul
    if not supports(module.qtype):
        return None
    from .gguf_gemv import TABLE_QTYPES

    if module.qtype in TABLE_QTYPES:  # the IQ4 level table, built now on the layer's device, not in a captured step
        iq4_table(module.qweight.device)
    return _gguf_kernel


def float_kernel_for(module):
    """The kernel hook for a float16 / bfloat16 QuantLinear (`float_gemv.float_matmul`: a split-K GEMV
    for decode rows, cuBLAS past them), or None (float32, or no Triton)."""
    if module.packed or module.weight.dtype not in (torch.float16, torch.bfloat16) or not _triton_available():
        return None
    from .float_gemv import float_matmul

    return float_matmul


def _gguf_kernel(x: torch.Tensor, module) -> torch.Tensor:
    return packed_matmul(x, module.qtype, module.qweight, module.out_features, module.in_features)


def dequantize_tile(qtype: str, data: torch.Tensor, row_start: int, row_stop: int,
                    dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None) -> torch.Tensor:
    from .dequant_tile import dequantize_tile as _dequantize_tile

    return _dequantize_tile(qtype, data, row_start, row_stop, dtype, out)


def packed_matmul(x: torch.Tensor, qtype: str, data: torch.Tensor, out_features: int,
                  in_features: int) -> torch.Tensor:
    """x [..., in_features] @ dequant(data).T -> [..., out_features] in x's dtype."""
    from .gguf_gemv import FLOAT_QTYPES, packed_gemv

    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*lead, out_features))
    if m <= MAX_M:
        return packed_gemv(x2, qtype, data, out_features, in_features).reshape(*lead, out_features)
    if qtype in FLOAT_QTYPES:
        return torch.matmul(x2, data.to(x2.dtype).t()).reshape(*lead, out_features)
    from .dequant_tile import DEQUANT_KERNELS

    if qtype in DEQUANT_KERNELS:
        def band(r0, r1):
            return dequantize_tile(qtype, data, r0, r1, x2.dtype).t()
    else:  # a format with a GEMV but no tile kernel (Q2_K, Q3_K, IQ4_*): torch's dequantization
        def band(r0, r1):
            return dequantize_rows((qtype, data), r0, r1, x2.dtype).t()
    y = banded_matmul(x2, out_features, PREFILL_BAND_ELEMS, band)
    return y.reshape(*lead, out_features)
