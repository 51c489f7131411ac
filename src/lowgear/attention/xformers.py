"""The xformers rung: `memory_efficient_attention` over gathered K/V with a block-diagonal causal mask.

Imported lazily. Each step's sequences are packed back to back (queries and gathered keys) and a
`BlockDiagonalCausalFromBottomRightMask` keeps each sequence to its own keys, causal from the
bottom right (queries are the last q_len of kv_len positions); a sliding window narrows it to a
local band. A wheel that imports but whose CUDA ops were built for another torch fails its probe
and is reported unavailable with the exception text.
"""

from __future__ import annotations

import importlib

import torch

from .base import AttentionBackend, Capabilities, ProbeResult, no_softcap
from .flash_attn import needs_sm
from .metadata import StepMetadata
from .sdpa import gather_packed, probe_case


class XformersBackend(AttentionBackend):
    name = "xformers"
    capabilities = Capabilities(
        paged=True,  # through gathering
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        min_compute_capability=(6, 0),
        cpu=False,
        package="xformers",
    )
    probe_device: torch.device | None = None  # tests: run the probe's tensors here instead

    def __init__(self):
        self._ops = None

    def _module(self):
        if self._ops is None:
            self._ops = importlib.import_module("xformers.ops")
        return self._ops

    def attend(self, q, k_cache, v_cache, meta: StepMetadata, scale, window, softcap=None):
        no_softcap(self, softcap)
        xops = self._module()
        masks = importlib.import_module("xformers.ops.fmha.attn_bias")
        k, _ = gather_packed(k_cache, meta)  # [sum kv, KVH, D]
        v, _ = gather_packed(v_cache, meta)
        group = q.shape[1] // k.shape[1]
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        bias = masks.BlockDiagonalCausalFromBottomRightMask.from_seqlens(
            q_seqlen=list(meta.q_lens_host), kv_seqlen=list(meta.kv_lens_host)
        )
        if window is not None:
            bias = bias.make_local_attention_from_bottomright(window)
        out = xops.memory_efficient_attention(q[None], k[None].to(q.dtype), v[None].to(q.dtype), attn_bias=bias, scale=scale)
        return out[0]

    def _probe(self, device, dtype: torch.dtype | None = None) -> ProbeResult:
        reason = needs_sm(device, self.capabilities.min_compute_capability)
        if reason and self.probe_device is None:
            return ProbeResult(False, reason)
        try:
            self._module()
        except ImportError as exc:
            return ProbeResult(False, f"xformers not importable: {exc}")
        dtype = dtype or torch.float16
        case = probe_case(self.probe_device or device.torch_device, dtype)
        err = case.check(self.attend(case.q, case.k_cache, case.v_cache, case.meta, case.scale, None))
        if err:
            return ProbeResult(False, f"probe gave wrong results: {err}")
        return ProbeResult(True, "memory_efficient_attention probe call ok")
