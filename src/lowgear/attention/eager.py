"""The eager rung: plain matmul + softmax per sequence. The reference every other rung is tested against.

It runs in the dtype it is given; `reference_attention` upcasts to float64 for tests.
"""

from __future__ import annotations

import torch

from .. import defaults
from .base import AttentionBackend, Capabilities, ProbeResult, gather_kv
from .metadata import StepMetadata


def causal_mask(q_len: int, kv_len: int, window: int | None, device) -> torch.Tensor:
    """[q_len, kv_len] bool, True where query i (at position kv_len - q_len + i) may see key j."""
    qpos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    kpos = torch.arange(kv_len, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def attend_one(q, k, v, scale: float, window: int | None, softcap: float | None = None) -> torch.Tensor:
    """q [q_len, H, D], k/v [kv_len, KVH, D] -> [q_len, H, D], causal, GQA by repeating kv heads;
    with `softcap`, the scaled scores become softcap * tanh(scores / softcap) before the mask."""
    q_len, heads, _ = q.shape
    kv_len, kv_heads, _ = k.shape
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    mask = causal_mask(q_len, kv_len, window, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.einsum("hqk,khd->qhd", probs, v)


class EagerBackend(AttentionBackend):
    name = "eager"
    capabilities = Capabilities(softcap=True, kv_dtypes=defaults.KV_CACHE_DTYPES)

    def _probe(self, device) -> ProbeResult:
        return ProbeResult(True, "plain torch; always available")

    def attend(self, q, k_cache, v_cache, meta: StepMetadata, scale, window, softcap=None):
        out = torch.empty_like(q)
        start = 0
        for s, (q_len, kv_len) in enumerate(zip(meta.q_lens_host, meta.kv_lens_host)):
            table = meta.block_tables[s]
            k = gather_kv(k_cache, table, kv_len)
            v = gather_kv(v_cache, table, kv_len)
            out[start : start + q_len] = attend_one(q[start : start + q_len], k, v, scale, window, softcap)
            start += q_len
        return out


def reference_attention(q, k_cache, v_cache, meta: StepMetadata, scale: float, window: int | None = None,
                        softcap: float | None = None):
    """Float64 eager attention over the cache: the independent reference for kernels' tests."""
    return EagerBackend().attend(q.double(), k_cache.double(), v_cache.double(), meta, scale, window, softcap)
