"""AWQ linear weights (AutoAWQ's "gemm" layout), repacked exactly into GPTQ tensors at load.

An AWQ layer of K inputs and N outputs, 4-bit, groups of g inputs, is three tensors:

    qweight  int32 [K, N / 8]      codes packed along the output dim
    qzeros   int32 [K / g, N / 8]  zero points packed the same way
    scales   fp16  [K / g, N]

Word j of a row holds the 8 codes of columns 8j .. 8j + 7, but not in order: bits [4i, 4i + 4) hold
column 8j + AWQ_ORDER[i], AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7). Zero points are stored as they are:

    W[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]

That is GPTQ with the zero points kept as stored (checkpoint_format "gptq_v2": no v1 offset), with
codes packed along K instead of N. `awq_to_gptq` unpacks the codes and zero points and packs them in
GPTQ's order (formats/gptq.py): the same integers and the same fp16 scales, so the values are
bit-for-bit those of the file, and the layer then runs on every GPTQ path (the torch band
dequantization, the split-K GEMV and the tl.dot kernel). Held as GPTQ it takes the same bytes.

Only version "gemm" with zero points and 4 bits is read; AWQ's "gemv" / "gemv_fast" layouts
(packed along K in other orders), Marlin and other bit widths are refused by `awq_config`.
"""

from __future__ import annotations

import torch

from ..errors import ModelFormatError, UnsupportedError
from .gptq import GPTQWeight, pack_codes

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8 * word + AWQ_ORDER[i]
AWQ_VERSIONS = ("gemm",)
AWQ_BITS = 4
# output columns repacked at a time: bounds the int64 temporaries
BAND = 4096


def awq_config(q: dict, folder: str) -> dict:
    """{"bits", "group_size"} of an AWQ quantization_config, or an UnsupportedError naming what is not read."""
    version = str(q.get("version", "gemm")).lower()
    bits = q.get("bits", q.get("w_bit"))
    group_size = q.get("group_size", q.get("q_group_size", 128))
    what = None
    if version not in AWQ_VERSIONS:
        what = f"AWQ version {version!r}"
    elif bits != AWQ_BITS:
        what = f"AWQ with {bits} bits"
    elif q.get("zero_point", True) is not True:
        what = "AWQ without zero points (zero_point false)"
    elif not isinstance(group_size, int) or isinstance(group_size, bool) or not (group_size == -1 or group_size > 0):
        raise ModelFormatError(f"{folder}: AWQ group_size is {group_size!r}, not a positive whole number; the config is corrupt")
    if what is not None:
        raise UnsupportedError(
            f"{folder}: {what} is not supported: lowgear reads 4-bit AWQ in the \"gemm\" layout with zero points "
            "(AutoAWQ's default); use such a checkpoint, or a GPTQ or GGUF one"
        )
    return {"bits": AWQ_BITS, "group_size": group_size}


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, N / 8] in AWQ's order -> codes int32 [R, N] in column order."""
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int32)
    nibbles = (words.unsqueeze(-1) >> shifts) & 15  # [R, N/8, 8]: nibble i is column AWQ_ORDER[i]
    column_of = torch.tensor(AWQ_ORDER, device=words.device)
    codes = torch.empty_like(nibbles)
    codes[..., column_of] = nibbles
    return codes.reshape(words.shape[0], -1)


def awq_to_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                name: str = "AWQ weight") -> GPTQWeight:
    """An AWQ "gemm" layer as the equal GPTQWeight (4-bit, zero points as stored)."""
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ModelFormatError(f"{name}.qweight must be int32 [in_features, out_features / 8], got {qweight.dtype} "
                               f"{list(qweight.shape)}; the checkpoint is corrupt or not AWQ")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    g = k if group_size == -1 else group_size
    if k % g or k % 8:
        raise ModelFormatError(f"{name}: {k} inputs are not whole groups of {g} (and of 8); the checkpoint is corrupt or "
                               "its quantization_config does not match it")
    for part, t, dtype, shape in (("qzeros", qzeros, torch.int32, [k // g, n // 8]),
                                  ("scales", scales, torch.float16, [k // g, n])):
        if list(t.shape) != shape or t.dtype != dtype:
            raise ModelFormatError(
                f"{name}.{part} must be {dtype} {shape} for a 4-bit AWQ layer of {k} inputs and {n} outputs with "
                f"group_size {group_size}, got {t.dtype} {list(t.shape)}; the checkpoint is corrupt or its "
                "quantization_config does not match it"
            )
    packed = torch.empty((k * AWQ_BITS // 32, n), dtype=torch.int32, device=qweight.device)
    for c0 in range(0, n, BAND):
        c1 = min(n, c0 + BAND)
        packed[:, c0:c1] = pack_codes(unpack_awq(qweight[:, c0 // 8: c1 // 8]), AWQ_BITS)
    zeros = pack_codes(unpack_awq(qzeros).t(), AWQ_BITS).t().contiguous()  # [groups, N/8], packed along N
    return GPTQWeight(packed, zeros, scales, None, AWQ_BITS, group_size, sym=False, zero_offset=0,
                      source_format="AWQ").validate(name)
