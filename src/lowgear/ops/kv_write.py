"""The torch KV-cache write: a step's new keys and values scattered to their flat cache slots.

The reference every fused write (ops/rope.py's rope + KV kernel) is tested against, and the write
the torch attention rungs use.

A quantized cache (`QuantizedKV`) stores each token's head vector in 8 or 4 bits with one float32
scale per token and head: int8 (round(x / s), s = max|x| / 127), float8 e4m3 (x / s, s = max|x| / 448)
or int4 (round(x / s), s = max|x| / 7, two codes to a byte).
It answers the few tensor calls the torch rungs make on a cache (`shape`, `view`, `index_select`,
`double`), returning dequantized values, so every gather-based rung reads it unchanged.
"""

from __future__ import annotations

import torch

# name -> (storage dtype, largest stored magnitude, codes per byte); the names are defaults.KV_CACHE_DTYPES'
# quantized ones. int4 codes are stored offset by 8 (0..15), two to a byte, the even element low.
KV_DTYPES = {
    "int8": (torch.int8, 127.0, 1),
    "fp8_e4m3": (torch.float8_e4m3fn, 448.0, 1),
    "int4": (torch.uint8, 7.0, 2),
}


class QuantizedKV:
    """K or V pages in 8 or 4 bits: data [pages, page_size, kv_heads, head_dim / codes per byte], scale
    [pages, page_size, kv_heads, 1] float32; `shape` is the logical [pages, page_size, kv_heads, head_dim];
    read back in `dtype`."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, kind: str, dtype: torch.dtype):
        self.data, self.scale, self.kind, self.dtype = data, scale, kind, dtype
        self.per_byte = KV_DTYPES[kind][2]

    @classmethod
    def zeros(cls, shape, kind: str, dtype: torch.dtype, device) -> "QuantizedKV":
        storage, _, per_byte = KV_DTYPES[kind]
        if shape[-1] % per_byte:
            raise ValueError(f"a {kind} KV cache needs an even head_dim, got {shape[-1]}")
        packed = (*shape[:-1], shape[-1] // per_byte)
        return cls(torch.zeros(packed, dtype=storage, device=device),
                   torch.zeros(*shape[:-1], 1, dtype=torch.float32, device=device), kind, dtype)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.data.shape[:-1], self.data.shape[-1] * self.per_byte))

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def view(self, *shape) -> "QuantizedKV":
        return QuantizedKV(self.data.view(*shape[:-1], shape[-1] // self.per_byte), self.scale.view(*shape[:-1], 1),
                           self.kind, self.dtype)

    def codes(self) -> torch.Tensor:
        """The stored values before their scale, float32 in the logical shape."""
        if self.per_byte == 1:
            return self.data.to(torch.float32)
        both = torch.stack((self.data & 0xF, self.data >> 4), dim=-1).flatten(-2)
        return both.to(torch.float32) - 8.0

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.codes() * self.scale).to(dtype or self.dtype)

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        assert dim == 0
        data = self.data.view(torch.uint8).index_select(0, index).view(self.data.dtype)
        return QuantizedKV(data, self.scale.index_select(0, index), self.kind, self.dtype).dequantize()

    def double(self) -> torch.Tensor:
        return self.dequantize(torch.float64)

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Quantize x [T, kv_heads, head_dim] and store it at the flat slots [T]."""
        storage, top, per_byte = KV_DTYPES[self.kind]
        kvh, width = self.data.shape[-2:]
        x = x.float()
        scale = x.abs().amax(dim=-1, keepdim=True) / top
        q = (x / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp_(-top, top)
        if self.kind == "fp8_e4m3":
            q = q.to(storage)
        elif per_byte == 1:
            q = q.round_().to(storage)
        else:
            q = (q.round_() + 8).to(torch.uint8)
            q = q[..., 0::2] | (q[..., 1::2] << 4)
        # (as bytes: CPU index ops do not take float8)
        self.data.view(torch.uint8).view(-1, kvh, width).index_copy_(0, slots, q.view(torch.uint8))
        self.scale.view(-1, kvh, 1).index_copy_(0, slots, scale)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache, v_cache, slot_mapping: torch.Tensor) -> None:
    """Scatter new keys/values [T, kv_heads, head_dim] into caches [pages, page_size, kv_heads, head_dim]
    at the flat slots slot_mapping [T] (a step's `StepMetadata.slot_mapping`)."""
    if isinstance(k_cache, QuantizedKV):
        k_cache.write(slot_mapping, k)
        v_cache.write(slot_mapping, v)
        return
    kvh, hd = k_cache.shape[-2:]
    k_cache.view(-1, kvh, hd).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, hd).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
