"""Unpacking llama.cpp block formats into float tensors, in torch.

Every function works on a uint8 tensor [rows, row_bytes] on any device (CPU or CUDA) and is
vectorized over rows and blocks: a block's fields are sliced out of a [rows, blocks, block_bytes]
view and combined with element-wise ops, so there is no Python loop over blocks. Arithmetic is done
in float32 in the same order as llama.cpp / gguf-py (e.g. `(d * sc) * q - dmin * m`) so results
match them bit for bit, then cast to the requested dtype. No tensor is built from host data here
(this runs inside captured CUDA graphs): shifts are separate ops, and IQ4's 16-level table is built
once per device from scalar fills (`iq4_table`).

This is the reference path and the prefill path (dequantize a tile, then a cuBLAS matmul);
`dequantize_rows` bounds the temporary to a range of rows and `dequantize_index` serves
embedding lookups without unpacking the whole table.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import ModelFormatError
from .spec import PackedTensor
from .blocks import FLOAT_TYPES, IQ4_VALUES, get_format

def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] bytes -> [...] float32 (little-endian half precision)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n]: all low nibbles first, then all high nibbles."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _nibbles_float(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n] float32, low nibbles then high, written straight into one buffer.

    Same values as `_nibbles(qs).float()` with two fewer passes over the block (no cat, no cast copy):
    this is the CPU decode path's hot loop.
    """
    n = qs.shape[-1]
    out = torch.empty(*qs.shape[:-1], 2 * n, dtype=torch.float32, device=qs.device)
    out[..., :n].copy_(qs & 0x0F)
    out[..., n:].copy_(qs >> 4)
    return out


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[..., 0:2])
    q = b[..., 2:34].contiguous().view(torch.int8).float()
    return q.mul_(d[..., None])


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[..., 0:2])
    return _nibbles_float(b[..., 2:18]).sub_(8.0).mul_(d[..., None])


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[..., 0:2])
    m = _f16(b[..., 2:4])
    return _nibbles_float(b[..., 4:20]).mul_(d[..., None]).add_(m[..., None])


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """[..., 4] bytes of a little-endian uint32 -> [..., 32] bits, bit j for weight j."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh[..., :, None] >> shifts) & 1).flatten(-2)


def q5_codes(b: torch.Tensor, qh: int) -> torch.Tensor:
    """A Q5_0 / Q5_1 block's 5-bit codes [..., 32] (uint8): fifth bits at byte qh, low nibbles after them."""
    return _nibbles(b[..., qh + 4 : qh + 20]) | (_fifth_bits(b[..., qh : qh + 4]) << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[..., 0:2])
    return d[..., None] * (q5_codes(b, 2).float() - 16.0)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[..., 0:2])
    m = _f16(b[..., 2:4])
    return d[..., None] * q5_codes(b, 4).float() + m[..., None]


def _k_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes of packed 6-bit values -> (scales [..., 8], mins [..., 8]) as float32.

    Sub-blocks 0-3 keep their scale and min in the low 6 bits of bytes 0-3 and 4-7; sub-blocks 4-7
    keep their low 4 bits in bytes 8-11 (scale low nibble, min high nibble) and their top 2 bits
    in the spare top bits of bytes 0-3 (scale) and 4-7 (min).
    """
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat((a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)), dim=-1)
    mn = torch.cat((b & 0x3F, (c >> 4) | ((b >> 6) << 4)), dim=-1)
    return sc.float(), mn.float()


def _k_low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> [..., 8, 32]: chunk c of 32 bytes holds sub-block 2c (low) and 2c+1 (high).

    Built from the input alone (no constant tensor from host data): this runs inside captured
    CUDA graphs, where a host-to-device copy is an error.
    """
    qs = qs.unflatten(-1, (4, 32))
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2).flatten(-3, -2)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[..., 0:2])
    dmin = _f16(b[..., 2:4])
    sc, mn = _k_scales_mins(b[..., 4:16])
    q = _k_low_nibbles(b[..., 16:144]).float()
    w = (d[..., None] * sc)[..., None] * q - (dmin[..., None] * mn)[..., None]
    return w.flatten(-2)


def q5_k_codes(b: torch.Tensor) -> torch.Tensor:
    """A Q5_K super-block's 5-bit codes [..., 8 sub-blocks, 32] (uint8)."""
    shifts = torch.arange(8, device=b.device, dtype=torch.uint8).view(8, 1)
    high = (b[..., None, 16:48] >> shifts) & 1  # [..., 8 sub-blocks, 32]: bit i of qh[l]
    return _k_low_nibbles(b[..., 48:176]) | (high << 4)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[..., 0:2])
    dmin = _f16(b[..., 2:4])
    sc, mn = _k_scales_mins(b[..., 4:16])
    q = q5_k_codes(b).float()
    w = (d[..., None] * sc)[..., None] * q - (dmin[..., None] * mn)[..., None]
    return w.flatten(-2)


def q6_k_codes(b: torch.Tensor) -> torch.Tensor:
    """A Q6_K super-block's 6-bit codes [..., 16 groups of 16] (uint8, 0..63: w = d * sc * (q - 32))."""
    ql = b[..., 0:128].unflatten(-1, (2, 2, 32))  # [half, a, 32]
    qh = b[..., 128:192].unflatten(-1, (2, 32))  # [half, 32]
    # shifts as separate ops, not a constant tensor: no host data inside a captured graph
    low = torch.stack((ql & 0x0F, ql >> 4), dim=-3).flatten(-3, -2)  # [half, 4 groups, 32]; g = nibble*2 + a
    high = torch.stack([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], dim=-2)  # group g takes bits 2g..2g+1
    return (low | (high << 4)).reshape(*b.shape[:-1], 16, 16)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    sc = b[..., 192:208].contiguous().view(torch.int8).float()  # one per 16 weights
    d = _f16(b[..., 208:210])
    q = (q6_k_codes(b).to(torch.int16) - 32).float()
    return ((d[..., None] * sc)[..., None] * q).flatten(-2)


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """[..., 64] bytes of 2-bit q -> [..., 16, 16]: half h (32 bytes) gives 4 groups of 32, shift 0, 2, 4, 6."""
    qs = qs.unflatten(-1, (2, 32))
    return torch.stack([(qs >> s) & 0x03 for s in (0, 2, 4, 6)], dim=-2).reshape(*qs.shape[:-2], 16, 16)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    sc = (b[..., 0:16] & 0x0F).float()
    mn = (b[..., 0:16] >> 4).float()
    d = _f16(b[..., 80:82])
    dmin = _f16(b[..., 82:84])
    q = _crumbs(b[..., 16:80]).float()
    w = (d[..., None] * sc)[..., None] * q - (dmin[..., None] * mn)[..., None]
    return w.flatten(-2)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    s = b[..., 96:108]
    low = torch.cat((s[..., 0:8] & 0x0F, s[..., 0:8] >> 4), dim=-1)
    high = torch.cat([(s[..., 8:12] >> k) & 0x03 for k in (0, 2, 4, 6)], dim=-1)
    sc = ((low | (high << 4)).to(torch.int16) - 32).float()  # [..., 16], one per 16 weights
    d = _f16(b[..., 108:110])
    hm = b[..., 0:32]
    hbit = torch.stack([(hm >> g) & 1 for g in range(8)], dim=-2).reshape(*hm.shape[:-1], 16, 16)
    # the third bit set means no offset: q = low 2 bits - 4 * (1 - bit)
    q = (_crumbs(b[..., 32:96]).to(torch.int16) - ((hbit ^ 1) << 2).to(torch.int16)).float()
    return ((d[..., None] * sc)[..., None] * q).flatten(-2)


_IQ4_TABLES: dict[torch.device, torch.Tensor] = {}


def iq4_table(device: torch.device) -> torch.Tensor:
    """IQ4_VALUES as float32 on `device`, built once per device from scalar fills (no host data copied)."""
    device = torch.device(device)
    table = _IQ4_TABLES.get(device)
    if table is None:
        table = torch.empty(len(IQ4_VALUES), dtype=torch.float32, device=device)
        for i, v in enumerate(IQ4_VALUES):
            table[i].fill_(float(v))
        _IQ4_TABLES[device] = table
    return table


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[..., 0:2])
    levels = iq4_table(b.device)[_nibbles(b[..., 2:18]).long()]
    return d[..., None] * levels


def _iq4_xs(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[..., 0:2])
    sh = b[..., 2:4]  # a little-endian uint16: bits 2i..2i+1 are sub-block i's top 2 scale bits
    high = torch.stack([(sh >> k) & 0x03 for k in (0, 2, 4, 6)], dim=-1).flatten(-2)
    sl = b[..., 4:8]
    low = torch.stack((sl & 0x0F, sl >> 4), dim=-1).flatten(-2)
    sc = ((low | (high << 4)).to(torch.int16) - 32).float()  # [..., 8], one per 32 weights
    idx = _nibbles(b[..., 8:136].unflatten(-1, (8, 16)))  # [..., 8, 32]
    levels = iq4_table(b.device)[idx.long()]
    return ((d[..., None] * sc)[..., None] * levels).flatten(-2)


_BLOCK_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "IQ4_NL": _iq4_nl,
    "IQ4_XS": _iq4_xs,
}


def _unpack(packed) -> tuple[str, torch.Tensor]:
    if isinstance(packed, PackedTensor):
        return packed.qtype, packed.data
    qtype, data = packed
    return qtype, data


def dequantize_data(qtype: str, data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [rows, row_bytes] in format `qtype` -> [rows, cols] of `dtype`."""
    if qtype in FLOAT_TYPES:
        return data.to(dtype)
    fmt = get_format(qtype)
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] % fmt.block_bytes:
        raise ModelFormatError(
            f"packed {qtype} data must be uint8 [rows, k*{fmt.block_bytes}], got {data.dtype} {list(data.shape)}: "
            "the weight file is corrupt or was read with the wrong type"
        )
    rows, nbytes = data.shape
    blocks = data.reshape(rows, nbytes // fmt.block_bytes, fmt.block_bytes)
    return _BLOCK_FNS[qtype](blocks).reshape(rows, -1).to(dtype)


def dequantize(packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A PackedTensor (or (qtype, uint8 [rows, row_bytes])) -> float [rows, cols]."""
    qtype, data = _unpack(packed)
    return dequantize_data(qtype, data, dtype)


def dequantize_rows(packed, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows start:stop only, so the float temporary is bounded by the range asked for."""
    qtype, data = _unpack(packed)
    return dequantize_data(qtype, data[start:stop], dtype)


def dequantize_index(packed, row_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `row_ids` (any shape) -> [*row_ids.shape, cols]; the embedding lookup of a packed table."""
    qtype, data = _unpack(packed)
    flat = row_ids.reshape(-1).to(device=data.device, dtype=torch.long)
    rows = dequantize_data(qtype, data.index_select(0, flat), dtype)
    return rows.reshape(*row_ids.shape, rows.shape[-1])


def band_width(n: int, k: int, max_elements: int) -> int:
    """Output columns per band so that a float [k, band] temporary stays under max_elements (at least 1)."""
    return max(1, min(n, max_elements // max(1, k)))


def banded_matmul(x2: torch.Tensor, n: int, max_elements: int,
                  weight_t: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """x2 [M, K] @ W.T -> [M, n], W.T built a band of output columns at a time.

    `weight_t(c0, c1)` returns W.T[:, c0:c1] ([K, c1 - c0], x2's dtype); bands are as wide as keeps
    that float temporary under `max_elements`. The prefill / torch path of every packed format.
    """
    band = band_width(n, x2.shape[1], max_elements)
    if band >= n:
        return x2 @ weight_t(0, n)
    y = x2.new_empty((x2.shape[0], n))
    for c0 in range(0, n, band):
        c1 = min(n, c0 + band)
        y[:, c0:c1] = x2 @ weight_t(c0, c1)
    return y
