"""GGUF Q4_0 and Q8_0 layers held as GPTQ tensors, exactly, so that they run on the GPTQ kernels.

A Q4_0 block is 32 consecutive weights of one row: an fp16 scale d and 32 4-bit codes q (byte i
holds code i in its low nibble and code i + 16 in its high one), w = (q - 8) * d. That is GPTQ
with 4 bits, groups of 32 along K, scale d and zero point 8, in GPTQ's "gptq_v2" form (zeros stored
as they are, no v1 offset). A Q8_0 block (fp16 d, 32 int8 q, w = q * d) is 8-bit GPTQ with codes
q + 128 and zero point 128. The values are the same, bit for bit, so nothing about the model
changes; only the layout does: GPTQ packs codes along K, which the split-K GEMV and the tl.dot
kernel read as 16-byte vectors along N (`ops/matmul/gptq_gemv.py`), where llama.cpp's 18- and 34-byte
blocks along K allow only 2-byte loads. Held this way a Q4_0 layer takes 0.64 bytes a weight
instead of 0.5625 (the GEMV's fp16 zeros and the packed zeros beside the scales).
why: docs/decisions/007-q4_0-q8_0-as-gptq.md

Q4_1 and the K-quants store a per-block minimum, whose zero point (-m / d) is not an integer, so
they keep their own kernels (`ops/matmul/gguf_gemv.py`).
"""

from __future__ import annotations

import torch

from ...formats.gptq import GPTQWeight

EXACT = {"Q4_0": (4, 8), "Q8_0": (8, 128)}  # GGUF type -> (GPTQ bits, zero point)
GROUP = 32
# output columns converted at a time: bounds the int64 temporaries of the packer
BAND = 4096


def can_hold(qtype: str, out_features: int, in_features: int) -> bool:
    """Whether a layer has an exact GPTQ form: a type in EXACT, and GPTQ's packing of N zero points
    into whole int32 words (N * bits a multiple of 32; a 32001-token head is not)."""
    return qtype in EXACT and in_features % GROUP == 0 and (out_features * EXACT[qtype][0]) % 32 == 0


def codes_and_scales(qtype: str, data: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF rows [N, row_bytes] uint8 -> (codes int32 [N, K] in 0 .. 2**bits - 1, scales fp16 [N, K / 32])."""
    n = data.shape[0]
    nb = in_features // GROUP
    if qtype == "Q4_0":
        blocks = data.reshape(n, nb, 18)
        qs = blocks[..., 2:].to(torch.int32)
        codes = torch.cat((qs & 15, qs >> 4), dim=-1)  # [N, nb, 32]: low nibbles are 0..15, high 16..31
    elif qtype == "Q8_0":
        blocks = data.reshape(n, nb, 34)
        codes = blocks[..., 2:].contiguous().view(torch.int8).to(torch.int32) + 128
    else:
        raise ValueError(f"{qtype} has no exact GPTQ form (only {', '.join(EXACT)})")
    scales = blocks[..., :2].contiguous().view(torch.float16).reshape(n, nb)
    return codes.reshape(n, in_features), scales


def gguf_to_gptq(qtype: str, data: torch.Tensor, in_features: int) -> GPTQWeight:
    """A Q4_0 / Q8_0 layer (GGUF rows [N, row_bytes], on any device) as the equal GPTQWeight."""
    from ...formats.gptq import pack_codes

    bits, zero = EXACT[qtype]
    n = data.shape[0]
    if not can_hold(qtype, n, in_features):
        raise ValueError(f"a {qtype} layer of {n} x {in_features} has no GPTQ form (see can_hold)")
    qweight = torch.empty((in_features * bits // 32, n), dtype=torch.int32, device=data.device)
    scales = torch.empty((in_features // GROUP, n), dtype=torch.float16, device=data.device)
    for c0 in range(0, n, BAND):
        c1 = min(n, c0 + BAND)
        codes, sc = codes_and_scales(qtype, data[c0:c1], in_features)
        qweight[:, c0:c1] = pack_codes(codes.t(), bits)
        scales[:, c0:c1] = sc.t()
    fill = 0
    for i in range(32 // bits):  # every field of the word holds the zero point
        fill |= zero << (i * bits)
    fill -= 1 << 32 if fill >= 1 << 31 else 0
    qzeros = torch.full((in_features // GROUP, n * bits // 32), fill, dtype=torch.int32, device=data.device)
    return GPTQWeight(qweight, qzeros, scales, None, bits, GROUP, True, 0).validate(f"{qtype} layer as GPTQ")
