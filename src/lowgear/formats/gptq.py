"""GPTQ linear weights: what a GPTQ checkpoint stores for one layer, and its torch dequantization.

A GPTQ layer is four tensors (the storage format AutoGPTQ / GPTQModel / transformers write):

    qweight  int32 [in_features * bits / 32, out_features]  codes packed along the input dim
    qzeros   int32 [groups, out_features * bits / 32]        zero points packed along the output dim
    scales   fp16  [groups, out_features]
    g_idx    int32 [in_features] (optional)                  the group of each input row (act-order)

Codes are packed little-end first as one bit stream per column (per row for qzeros): value i sits
at bits [i*bits, (i+1)*bits), so 3-bit values straddle int32 word boundaries. Without g_idx, input
row i belongs to group i // group_size (group_size -1: one group). Checkpoint format "gptq" (v1)
stores zero - 1, "gptq_v2" the zero itself, so

    W[out, in] = (q[in, out] - zero[g_idx[in], out]) * scale[g_idx[in], out]

A layer converted from a GGUF type whose blocks store a minimum (Q4_1, Q5_1, Q4_K, Q5_K:
ops/matmul/repack.py) has zero points that are not integers: it holds them as `float_zeros`
(fp16 [groups, out_features]) and no qzeros. Where every group of a column has the same zero (Q6_K's 32,
Q5_0's 16), float_zeros is the one row [1, out_features] (`one_zero_row`), and the kernels read it for
every group.

`dequantize_gptq` builds any band of output rows from the packed tensors alone, so a linear layer
never holds the full float matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ModelFormatError, UnsupportedError

GPTQ_BITS = (2, 3, 4, 8)
HELD_BITS = GPTQ_BITS + (6,)  # widths a layer may be held at: GPTQ's, and 6 for GGUF's 6-bit codes (ops/matmul/repack.py)
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what to add to stored zeros


@dataclass
class GPTQWeight:
    """One GPTQ linear layer as stored; W is [out_features, in_features]."""

    qweight: torch.Tensor  # int32 [in * bits / 32, out]
    qzeros: torch.Tensor | None  # int32 [groups, out * bits / 32]; None where float_zeros holds the zeros
    scales: torch.Tensor  # float16 [groups, out]
    g_idx: torch.Tensor | None  # int32 [in], or None for the plain i // group_size
    bits: int
    group_size: int  # -1: one group over all inputs
    sym: bool = True
    zero_offset: int = 1  # 1 for checkpoint_format "gptq" (v1), 0 for "gptq_v2"
    float_zeros: torch.Tensor | None = None  # float16 [groups or 1, out]: zeros as they are (offset not added)
    source_format: str = "GPTQ"  # the file's format, for the name lowgear reports ("AWQ": repacked at load, awq.py)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 32 // self.bits

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def groups(self) -> int:
        return gptq_groups(self.in_features, self.group_size)

    @property
    def qtype(self) -> str:
        return gptq_qtype(self.bits, self.group_size, self.source_format)

    @property
    def nbytes(self) -> int:
        parts = [t for t in (self.qweight, self.qzeros, self.scales, self.g_idx, self.float_zeros) if t is not None]
        return sum(t.numel() * t.element_size() for t in parts)

    def validate(self, name: str = "GPTQ weight") -> GPTQWeight:
        """Raise a clear error unless the four tensors fit each other; returns self."""
        check_gptq_bits(self.bits, name, HELD_BITS)
        if self.qweight.dim() != 2 or self.qweight.dtype != torch.int32 or (self.qweight.shape[0] * 32) % self.bits:
            raise ModelFormatError(
                f"{name}.qweight must be int32 [in_features * {self.bits} / 32, out_features], got "
                f"{self.qweight.dtype} {list(self.qweight.shape)}; the checkpoint is corrupt or not GPTQ"
            )
        out = self.out_features
        expected = {"scales": (self.scales, torch.float16, [self.groups, out])}
        if self.float_zeros is not None:
            rows = 1 if self.float_zeros.dim() == 2 and self.float_zeros.shape[0] == 1 else self.groups
            expected["float_zeros"] = (self.float_zeros, torch.float16, [rows, out])
        if self.qzeros is not None or self.float_zeros is None:
            expected["qzeros"] = (self.qzeros, torch.int32, [self.groups, out * self.bits // 32])
        if self.g_idx is not None:
            expected["g_idx"] = (self.g_idx, torch.int32, [self.in_features])
        for part, (t, dtype, shape) in expected.items():
            if t is None or list(t.shape) != shape or t.dtype != dtype or (part == "qzeros" and (out * self.bits) % 32):
                raise ModelFormatError(
                    f"{name}.{part} must be {dtype} {shape} for a {self.bits}-bit layer of {self.in_features} "
                    f"inputs and {out} outputs with group_size {self.group_size}, got "
                    f"{'nothing' if t is None else f'{t.dtype} {list(t.shape)}'}; "
                    "the checkpoint is corrupt or its quantization_config does not match it"
                )
        return self


def one_zero_row(zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp16 zeros [groups, N] as the one row [1, N] where every group of each column has the same zero (a
    group whose scale is 0 excepted: its weights are 0 whatever its zero), else as they are. Q4_0, Q8_0,
    Q5_0, Q6_K and symmetric GPTQ have one zero a layer: the row saves a zero a group (16 bits a group:
    0.5 bits a weight at group 32, 1 at Q6_K's 16). why: docs/decisions/013-gguf-as-gptq.md"""
    if zeros.shape[0] <= 1:
        return zeros
    live = scales.view(torch.float16) != 0
    first = live.to(torch.uint8).argmax(0)  # each column's first group with a scale (0 where it has none)
    row = zeros.gather(0, first[None, :])
    if bool(((zeros == row) | ~live).all()):
        return row.contiguous()
    return zeros


def zero_row(zeros: torch.Tensor, in_features: int, group_size: int) -> bool:
    """Whether a kernel reads `zeros` as one row [1, N] for all of a layer's groups (`one_zero_row`)."""
    return zeros.shape[0] == 1 and gptq_groups(in_features, group_size) > 1


def gptq_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size in (-1, 0) or group_size >= in_features else -(-in_features // group_size)


def gptq_qtype(bits: int, group_size: int, source_format: str = "GPTQ") -> str:
    """The name lowgear reports: "GPTQ4g128", or "GPTQ4g-1" for one group per column ("AWQ4g128" for AWQ)."""
    return f"{source_format}{bits}g{group_size}"


def check_gptq_bits(bits: int, where: str, widths: tuple[int, ...] = GPTQ_BITS) -> None:
    if bits not in widths:
        raise UnsupportedError(
            f"{where}: GPTQ with {bits} bits is not supported: lowgear reads {', '.join(map(str, widths))}-bit GPTQ"
        )


def pack_shape(bits: int) -> tuple[int, int]:
    """(codes, int32 words) per row-group, the fewest codes that fill whole words: 32 / bits codes in one
    word at 2, 4 and 8 bits; 32 codes in 3 words at 3 bits, 16 in 3 at 6."""
    words = bits // math.gcd(bits, 32)
    return words * 32 // bits, words


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int codes [K, N] (K a multiple of the row-group) -> GPTQ qweight int32 [K * bits / 32, N]."""
    pack, words = pack_shape(bits)
    k, n = codes.shape
    c = codes.to(torch.int64).reshape(k // pack, pack, n)
    out = torch.zeros((k // pack, words, n), dtype=torch.int64, device=codes.device)
    for j in range(pack):
        p = j * bits
        w, s = divmod(p, 32)
        out[:, w] |= (c[:, j] << s) & 0xFFFFFFFF
        if s + bits > 32:
            out[:, w + 1] |= c[:, j] >> (32 - s)
    out = torch.where(out >= 1 << 31, out - (1 << 32), out)
    return out.reshape(k // pack * words, n).to(torch.int32)


def unpack_bits(words: torch.Tensor, bits: int, index: torch.Tensor) -> torch.Tensor:
    """Values number `index` [n] of the little-end bit stream along words' last dim -> [..., n] int64."""
    pos = index.to(device=words.device, dtype=torch.long) * bits
    word, shift = pos // 32, pos % 32
    mask = (1 << bits) - 1
    if 32 % bits == 0:  # no value straddles two words
        return (words.index_select(-1, word).long() >> shift) & mask
    lo = words.index_select(-1, word).long() & 0xFFFFFFFF
    nxt = (word + 1).clamp(max=words.shape[-1] - 1)
    hi = words.index_select(-1, nxt).long() & 0xFFFFFFFF
    return (((hi << 32) | lo) >> shift) & mask


def group_index(w: GPTQWeight) -> torch.Tensor:
    """The group of each input row [in] (long)."""
    if w.g_idx is not None:
        return w.g_idx.long()
    rows = torch.arange(w.in_features, device=w.qweight.device)
    if w.groups == 1:
        return torch.zeros_like(rows)
    return rows // w.group_size


def dequantize_gptq(
    w: GPTQWeight, rows: slice | torch.Tensor | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Output rows `rows` (a slice or index tensor; None: all) of W -> float [n_rows, in_features]."""
    dev = w.qweight.device
    if rows is None:
        qw, sc = w.qweight, w.scales
        out_ids = torch.arange(w.out_features, device=dev)
    else:
        out_ids = torch.arange(w.out_features, device=dev)[rows]
        qw, sc = w.qweight.index_select(1, out_ids), w.scales.index_select(1, out_ids)
    if 32 % w.bits == 0:  # whole values per word: one shift per position in the word
        per = 32 // w.bits
        shifts = torch.arange(per, device=dev, dtype=torch.int32) * w.bits
        q = ((qw.unsqueeze(1) >> shifts[None, :, None]) & ((1 << w.bits) - 1)).reshape(-1, qw.shape[1]).t()
    else:
        q = unpack_bits(qw.t(), w.bits, torch.arange(w.in_features, device=dev))  # [n_rows, in]
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if w.float_zeros is not None:
        zeros = w.float_zeros.index_select(1, out_ids).to(work)  # [groups, n_rows]
        q = q.to(work)
    else:
        zeros = unpack_bits(w.qzeros, w.bits, out_ids) + w.zero_offset  # [groups, n_rows]
    if w.g_idx is None and w.groups > 1 and w.in_features % w.group_size == 0:  # groups are runs of rows
        g = w.group_size
        codes = (q.reshape(q.shape[0], -1, g) - zeros.t().unsqueeze(2)).to(work)
        return (codes * sc.t().unsqueeze(2).to(work)).reshape(q.shape[0], -1).to(dtype)
    gi = group_index(w)
    gz = torch.zeros_like(gi) if zeros.shape[0] == 1 else gi  # one zero row serves every group
    codes = (q - zeros.t().index_select(1, gz)).to(work)  # [n_rows, in]
    return (codes * sc.t().index_select(1, gi).to(work)).to(dtype)
