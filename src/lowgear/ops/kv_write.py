"""The torch KV-cache write: a step's new keys and values scattered to their flat cache slots.

The reference every fused write (ops/rope.py's rope + KV kernel) is tested against, and the write
the torch attention rungs use.

A quantized cache (`QuantizedKV`) stores each token's head vector in 8 bits with one float32 scale
per token and head: int8 (round(x / s), s = max|x| / 127) or float8 e4m3 (x / s, s = max|x| / 448).
It answers the few tensor calls the torch rungs make on a cache (`shape`, `view`, `index_select`,
`double`), returning dequantized values, so every gather-based rung reads it unchanged.
"""

from __future__ import annotations

import torch

# name -> (storage dtype, largest stored magnitude); the names are defaults.KV_CACHE_DTYPES' 8-bit ones
KV_DTYPES = {
    "int8": (torch.int8, 127.0),
    "fp8_e4m3": (torch.float8_e4m3fn, 448.0),
}


class QuantizedKV:
    """K or V pages in 8 bits: data [pages, page_size, kv_heads, head_dim], scale [pages, page_size, kv_heads, 1]
    float32; read back in `dtype`."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, kind: str, dtype: torch.dtype):
        self.data, self.scale, self.kind, self.dtype = data, scale, kind, dtype

    @classmethod
    def zeros(cls, shape, kind: str, dtype: torch.dtype, device) -> "QuantizedKV":
        storage, _ = KV_DTYPES[kind]
        return cls(torch.zeros(shape, dtype=storage, device=device),
                   torch.zeros(*shape[:-1], 1, dtype=torch.float32, device=device), kind, dtype)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return self.data.numel()

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def view(self, *shape) -> "QuantizedKV":
        return QuantizedKV(self.data.view(*shape), self.scale.view(*shape[:-1], 1), self.kind, self.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        return (self.data.to(torch.float32) * self.scale).to(dtype)

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        assert dim == 0
        data = self.data.view(torch.uint8).index_select(0, index).view(self.data.dtype)
        return QuantizedKV(data, self.scale.index_select(0, index), self.kind, self.dtype).dequantize()

    def double(self) -> torch.Tensor:
        return self.dequantize(torch.float64)

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Quantize x [T, kv_heads, head_dim] and store it at the flat slots [T]."""
        storage, top = KV_DTYPES[self.kind]
        kvh, hd = self.data.shape[-2:]
        x = x.float()
        scale = x.abs().amax(dim=-1, keepdim=True) / top
        q = x / torch.where(scale > 0, scale, torch.ones_like(scale))
        q = q.round().clamp_(-top, top) if storage == torch.int8 else q.clamp_(-top, top)
        # (as bytes: CPU index ops do not take float8)
        self.data.view(torch.uint8).view(-1, kvh, hd).index_copy_(0, slots, q.to(storage).view(torch.uint8))
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
