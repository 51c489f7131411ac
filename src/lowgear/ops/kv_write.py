"""The torch KV-cache write: a step's new keys and values scattered to their flat cache slots.

The reference every fused write (ops/rope.py's rope + KV kernel) is tested against, and the write
the torch attention rungs use.
"""

from __future__ import annotations

import torch


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new keys/values [T, kv_heads, head_dim] into caches [pages, page_size, kv_heads, head_dim]
    at the flat slots slot_mapping [T] (a step's `StepMetadata.slot_mapping`)."""
    kvh, hd = k_cache.shape[-2:]
    k_cache.view(-1, kvh, hd).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, hd).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
