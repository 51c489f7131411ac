"""Fusing linears that read the same input (q|k|v, gate|up) into one, at load time.

A decode step at batch 1 is a chain of GEMVs, and the small ones run far below memory bandwidth:
on an H100 cuBLAS reads a 1024x4096 k or v projection at ~1.1 TB/s and the 4-bit GPTQ GEMV a
1024x4096 layer at 0.18 TB/s, against ~1.4 TB/s at 14336x4096 (benchmarks/results/h100-*). One
launch over the concatenated output rows reads the same bytes in fewer, larger launches. The layer
splits the fused output back into views (no copy).

Fusing never unpacks anything: each format is concatenated in its stored layout, along its output
dimension.

    float          [N, K] rows                      cat dim 0 (widening to a common dtype is exact)
    GGUF packed    uint8 [N, row_bytes] rows         cat dim 0, same qtype and K
    GPTQ           qweight [K*b/32, N], qzeros [G, N*b/32], scales [G, N]: cat along N, with equal
                   bits / group_size / sym / zero_offset and one g_idx shared by all (or none);
                   each part's N*b is a multiple of 32 (GPTQWeight.validate checks it), so its
                   zero points fill whole words and the words concatenate
    EXL2           never: each matrix has its own input permutation and its own groups of rows

Biases (qwen2's q/k/v) are concatenated too; a set where only some parts have one is not fused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..formats.exl2 import EXL2Weight
from ..formats.gptq import GPTQWeight
from ..formats.spec import PackedTensor

Weight = torch.Tensor | PackedTensor | GPTQWeight | EXL2Weight


def out_features(w: Weight) -> int:
    """Output rows of a weight as the source gives it."""
    if isinstance(w, (GPTQWeight, EXL2Weight)):
        return int(w.out_features)
    return int(w.shape[0])  # float [N, K] or PackedTensor (shape is logical (N, K))


def fuse_weights(parts: Sequence[Weight]) -> Weight | None:
    """One weight whose output rows are the parts' rows in order, or None when they cannot be fused."""
    if len(parts) < 2:
        return None
    first = parts[0]
    if isinstance(first, EXL2Weight):
        return None
    if any(type(p) is not type(first) for p in parts):
        return None
    if isinstance(first, GPTQWeight):
        return _fuse_gptq(parts)
    if isinstance(first, PackedTensor):
        return _fuse_packed(parts)
    if isinstance(first, torch.Tensor):
        return _fuse_float(parts)
    return None


def fuse_linear(weights: Sequence[Weight], biases: Sequence[torch.Tensor | None] | None = None):
    """(fused weight, fused bias or None), or None when the weights or biases cannot be fused."""
    biases = list(biases) if biases is not None else [None] * len(weights)
    have = [b is not None for b in biases]
    if any(have) and not all(have):
        return None
    if all(have) and any(b.dim() != 1 or b.shape[0] != out_features(w) for w, b in zip(weights, biases)):
        return None
    weight = fuse_weights(weights)
    if weight is None:
        return None
    bias = torch.cat(biases) if all(have) else None
    return weight, bias


def _same_device(parts: Sequence[torch.Tensor]) -> bool:
    return all(p.device == parts[0].device for p in parts)


def _fuse_float(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    if not _same_device(parts) or any(p.dim() != 2 or not p.is_floating_point() for p in parts):
        return None
    if any(p.shape[1] != parts[0].shape[1] for p in parts):
        return None
    return torch.cat(list(parts), dim=0)  # mixed float dtypes widen, exactly; the model casts once after


def _fuse_packed(parts: Sequence[PackedTensor]) -> PackedTensor | None:
    first = parts[0]
    if any(p.qtype != first.qtype or p.shape[1] != first.shape[1] for p in parts):
        return None
    datas = [p.data for p in parts]
    if not _same_device(datas) or any(d.dtype != torch.uint8 or d.dim() != 2 or d.shape[1] != datas[0].shape[1]
                                      for d in datas):
        return None
    rows = sum(int(p.shape[0]) for p in parts)
    return PackedTensor(first.qtype, torch.cat(datas, dim=0), (rows, int(first.shape[1])))


def _fuse_gptq(parts: Sequence[GPTQWeight]) -> GPTQWeight | None:
    first = parts[0]
    if any(_gptq_facts(p) != _gptq_facts(first) for p in parts):
        return None
    if any((p.out_features * p.bits) % 32 for p in parts):  # zero points must fill whole words
        return None
    if any(p.qzeros is None for p in parts):  # float zeros (GGUF minima) are made after fusing: never fused
        return None
    tensors = [t for p in parts for t in (p.qweight, p.qzeros, p.scales, p.g_idx) if t is not None]
    if not _same_device(tensors):
        return None
    if first.g_idx is None:
        if any(p.g_idx is not None for p in parts):
            return None
    elif any(p.g_idx is None or not torch.equal(p.g_idx, first.g_idx) for p in parts):
        return None  # act-order layers that sorted their inputs differently
    return GPTQWeight(
        qweight=torch.cat([p.qweight for p in parts], dim=1),
        qzeros=torch.cat([p.qzeros for p in parts], dim=1),
        scales=torch.cat([p.scales for p in parts], dim=1),
        g_idx=first.g_idx,
        bits=first.bits,
        group_size=first.group_size,
        sym=first.sym,
        zero_offset=first.zero_offset,
        source_format=first.source_format,
    ).validate("fused GPTQ weight")


def _gptq_facts(w: GPTQWeight) -> tuple:
    return (w.bits, w.group_size, w.sym, w.zero_offset, w.in_features, w.source_format)
