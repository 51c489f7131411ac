"""GGUF layers held as GPTQ tensors, so that they run on the GPTQ kernels (GEMV, tl.dot, prefill).

GPTQ packs codes along K, which the split-K GEMV and the tl.dot kernel read as 16-byte vectors along
N (`ops/matmul/gptq_gemv.py`), where llama.cpp's 18- to 210-byte blocks along K allow only 2-byte
loads. Every GGUF type below is, per group of 16 or 32 weights of a row, w = (code - zero) * scale:

    type   codes (GPTQ bits)      group  scale        zero              held as
    Q4_0   q (4)                  32     d            8                 packed integer zeros: exact
    Q8_0   q + 128 (8)            32     d            128               packed integer zeros: exact
    Q5_0   q (6 or 8)             32     d            16                float zeros: exact
    Q6_K   q (6 or 8)             16     d * sc       32                float zeros; scale rounded to fp16
    Q4_1   q (4)                  32     d            -m / d            float zeros
    Q5_1   q (6 or 8)             32     d            -m / d            float zeros
    Q4_K   q (4)                  32     d * sc       dmin * m / scale  float zeros
    Q5_K   q (6 or 8)             32     d * sc       dmin * m / scale  float zeros

Q4_0 and Q8_0 keep GPTQ's packed integer zeros and are the same weights bit for bit. The others hold
fp16 zeros [groups, N] (`GPTQWeight.float_zeros`) and no qzeros: a block minimum's zero point is not
an integer. A layer with one zero a column holds its fp16 zeros as one row [1, N] (Q5_0's and Q6_K's
float zeros here, Q4_0's and Q8_0's GEMV zeros in `gptq_gemv.prepare`: `formats.gptq.one_zero_row`).
Scales and zeros are fp16, so a weight can differ from llama.cpp's by the rounding of its group's scale
(2**-11 of |code * scale|) and zero (2**-11 of |dmin * m|), the size of the rounding an fp16 activation
path gives every weight anyway (`tests/test_quant_repack.py` bounds it). A group whose scale is 0 is the
constant -dmin * m (or m): its codes are rewritten to 0 with zero -1 and scale the constant. A layer
whose zero would overflow fp16 keeps its block kernel (`gguf_to_gptq` -> None). 5- and 6-bit codes take
6-bit codes on sm_80+ (`six_bit`: 16 codes in 3 words, which the GEMV, the tl.dot kernel and the
dequantizer read) and 8-bit codes below it (the mma.sync kernel's width): a Q6_K layer takes 7 or 9 bits a
weight against the file's 6.56, Q5_K 7 or 9 against 5.5 (Q4_K: 5 against 4.5; Q4_0 and Q8_0 read what the
file holds at decode, 4.5 and 8.5).
why: docs/decisions/007-q4_0-q8_0-as-gptq.md, docs/decisions/013-gguf-as-gptq.md
"""

from __future__ import annotations

import math

import torch

from ...formats.blocks import get_format
from ...formats.dequant import _f16, _k_low_nibbles, _k_scales_mins, _nibbles, q5_codes, q5_k_codes, q6_k_codes
from ...formats.gptq import GPTQWeight, one_zero_row

EXACT = {"Q4_0": (4, 8), "Q8_0": (8, 128)}  # integer zeros, packed as GPTQ does: type -> (bits, zero point)
INTEGER_ZERO = {"Q5_0": 16, "Q6_K": 32}  # float-zero types whose zero point is one integer
FLOAT_ZERO = {"Q5_0": (8, 32), "Q6_K": (8, 16), "Q4_1": (4, 32), "Q5_1": (8, 32), "Q4_K": (4, 32),
              "Q5_K": (8, 32)}  # type -> (GPTQ bits, group size)
# SIX_BIT: 5- and 6-bit codes take 6-bit codes (16 in 3 words) on GPUs whose tl.dot kernel serves them in
# batched decode (SIX_BIT_FROM, sm_80+); elsewhere 8-bit ones, which the mma.sync kernel (qmma.cu) takes
# on sm_75. why: docs/decisions/027-six-bit-codes.md
SIX_BIT = False
SIX_BIT_FROM = (8, 0)
# output columns converted at a time: bounds the temporaries of the packer
BAND = 4096


def layout(qtype: str, six_bit: bool = False) -> tuple[int, int]:
    """(GPTQ bits, group size) of a type that has a GPTQ form; six_bit: 5/6-bit codes as 6-bit ones."""
    if qtype in EXACT:
        return EXACT[qtype][0], 32
    bits, group = FLOAT_ZERO[qtype]
    return (6 if six_bit and bits == 8 else bits), group


def held_bits(qtype: str, six_bit: bool = False) -> float:
    """Bits a weight of a type with a GPTQ form takes as held: codes, an fp16 scale a group, and the zeros (packed
    integer zeros a group for Q4_0 / Q8_0, the prefill dequantizer's; an fp16 zero a group for the float-zero types,
    none for Q5_0 / Q6_K, whose one zero a column is one row; that row, [1, N], is not counted)."""
    bits, group = layout(qtype, six_bit)
    if qtype in EXACT:
        return bits + (16 + bits) / group
    return bits + (16 if qtype in INTEGER_ZERO else 32) / group


def gpu_held_bytes(qtype: str, shape, stored: int) -> int:
    """Bytes a packed linear takes on a GPU (`platform.placement.device_bytes`' `held`): a layer of a type with a
    GPTQ form is rewritten at load (`gguf_to_gptq`), counted at 8-bit codes for 5/6-bit types (the most any GPU
    holds; Q6_K 9 bits a weight against the file's 6.56); any other packed weight as stored."""
    if len(shape) != 2 or not can_hold(qtype, int(shape[0]), int(shape[1])):
        return stored
    return max(stored, math.ceil(int(shape[0]) * int(shape[1]) * held_bits(qtype) / 8))


def six_bit(device: torch.device, capability: tuple[int, int] | None = None) -> bool:
    """Whether layers on this device hold 5/6-bit codes as 6-bit codes (capability: the device's, if known)."""
    if not SIX_BIT:
        return False
    if capability is None:
        if device.type != "cuda":
            return False
        capability = torch.cuda.get_device_capability(device)
    return tuple(capability) >= SIX_BIT_FROM


def can_hold(qtype: str, out_features: int, in_features: int) -> bool:
    """Whether a layer has a GPTQ form by its type and shape: a type above, whole blocks, and (for packed
    integer zeros) N * bits a multiple of 32, GPTQ's packing of N zero points into int32 words."""
    if qtype not in EXACT and qtype not in FLOAT_ZERO:
        return False
    if in_features % get_format(qtype).block_size:
        return False
    return qtype not in EXACT or (out_features * EXACT[qtype][0]) % 32 == 0


def parts(qtype: str, data: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF rows [N, row_bytes] uint8 -> (codes int32 [N, K], scale float32 [N, K / group], offset float32
    [N, K / group]) with w = code * scale - offset for each group (offset = zero * scale)."""
    n = data.shape[0]
    fmt = get_format(qtype)
    b = data.reshape(n, in_features // fmt.block_size, fmt.block_bytes)
    zero = {**INTEGER_ZERO, **{t: z for t, (_, z) in EXACT.items()}}  # the integer zero points
    if qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        d = _f16(b[..., 0:2])
        if qtype == "Q8_0":
            q = b[..., 2:34].contiguous().view(torch.int8).to(torch.int32) + 128
        elif qtype == "Q4_0":
            q = _nibbles(b[..., 2:18])
        elif qtype == "Q4_1":
            q = _nibbles(b[..., 4:20])
        else:
            q = q5_codes(b, 2 if qtype == "Q5_0" else 4)
        scale = d
        offset = -_f16(b[..., 2:4]) if qtype in ("Q4_1", "Q5_1") else zero[qtype] * d
    elif qtype in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _k_scales_mins(b[..., 4:16])
        q = _k_low_nibbles(b[..., 16:144]) if qtype == "Q4_K" else q5_k_codes(b)
        scale, offset = d[..., None] * sc, dmin[..., None] * mn
    elif qtype == "Q6_K":
        q = q6_k_codes(b)
        scale = _f16(b[..., 208:210])[..., None] * b[..., 192:208].contiguous().view(torch.int8).float()
        offset = zero[qtype] * scale
    else:
        raise ValueError(f"{qtype} has no GPTQ form")
    return q.to(torch.int32).reshape(n, in_features), scale.reshape(n, -1), offset.reshape(n, -1)


def _float_zeros(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int,
                 integer_zero: int | None = None):
    """fp16 (scale, zero) with (code - zero) * scale = code * scale - offset, codes rewritten where the
    scale is 0; None where a zero overflows fp16. integer_zero: the type's zero point (Q5_0 16, Q6_K 32),
    kept exact wherever the scale is held (offset / scale would carry the scale's fp16 rounding)."""
    s16 = scale.to(torch.float16)
    flat = s16 == 0
    if bool(flat.any()):  # the group is the constant -offset: codes 0, zero -1, scale -offset
        codes.view(codes.shape[0], -1, group).masked_fill_(flat[..., None], 0)
        s16 = torch.where(flat, (-offset).to(torch.float16), s16)
    zero = offset / s16.float().masked_fill(s16 == 0, 1.0)  # (a group of zeros: scale 0, zero 0)
    zero = torch.where(flat & (s16 != 0), torch.full_like(zero, -1.0), zero)
    if integer_zero is not None:
        zero = torch.where(flat, zero, torch.full_like(zero, float(integer_zero)))
    z16 = zero.to(torch.float16)
    if not bool(torch.isfinite(z16).all()) or not bool(torch.isfinite(s16).all()):
        return None
    return s16, z16


def gguf_to_gptq(qtype: str, data: torch.Tensor, in_features: int, six_bit: bool = False) -> GPTQWeight | None:
    """A GGUF layer (rows [N, row_bytes], on any device) as a GPTQWeight (see the table above; six_bit:
    5/6-bit codes as 6-bit codes); None where a float zero would overflow fp16 (the layer keeps its block
    kernel)."""
    from ...formats.gptq import pack_codes

    n = data.shape[0]
    if not can_hold(qtype, n, in_features):
        raise ValueError(f"a {qtype} layer of {n} x {in_features} has no GPTQ form (see can_hold)")
    bits, group = layout(qtype, six_bit)
    groups = in_features // group
    qweight = torch.empty((in_features * bits // 32, n), dtype=torch.int32, device=data.device)
    scales = torch.empty((groups, n), dtype=torch.float16, device=data.device)
    zeros = None if qtype in EXACT else torch.empty((groups, n), dtype=torch.float16, device=data.device)
    for c0 in range(0, n, BAND):
        c1 = min(n, c0 + BAND)
        codes, scale, offset = parts(qtype, data[c0:c1], in_features)
        if zeros is None:
            scales[:, c0:c1] = scale.t().to(torch.float16)  # d itself: exact
        else:
            held = _float_zeros(codes, scale, offset, group, INTEGER_ZERO.get(qtype))
            if held is None:
                return None
            scales[:, c0:c1], zeros[:, c0:c1] = held[0].t(), held[1].t()
        qweight[:, c0:c1] = pack_codes(codes.t(), bits)
    if zeros is not None:  # Q5_0's and Q6_K's one zero a layer: held as one row
        zeros = one_zero_row(zeros, scales)
        return GPTQWeight(qweight, None, scales, None, bits, group, True, 0, float_zeros=zeros).validate(f"{qtype} layer as GPTQ")
    zero = EXACT[qtype][1]
    fill = 0
    for i in range(32 // bits):  # every field of the word holds the zero point
        fill |= zero << (i * bits)
    fill -= 1 << 32 if fill >= 1 << 31 else 0
    qzeros = torch.full((groups, n * bits // 32), fill, dtype=torch.int32, device=data.device)
    return GPTQWeight(qweight, qzeros, scales, None, bits, group, True, 0).validate(f"{qtype} layer as GPTQ")
