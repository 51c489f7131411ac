"""The sdpa rung: torch's scaled_dot_product_attention over K/V gathered from the pages.

It runs wherever torch runs (its memory-efficient kernel covers sm_50+, the CPU has its own), so it
is the rung every GPU below sm_80 lands on. Decode steps go through one batched call: each
sequence's pages gathered into a padded [B, max_kv] block with a key-padding mask. Prefill and mixed
steps call sdpa once per sequence, where q_len == kv_len lets it use `is_causal` (its fastest
kernels) and anything else gets an explicit bottom-right causal mask.

Its calls leave torch's cuDNN attention out (`without_cudnn`). Where torch picks cuDNN (Hopper),
each query / key length it has not seen builds a cuDNN graph before it runs, and a server meets a
new prompt length with nearly every request. torch's flash and memory-efficient kernels serve
every call this rung makes. why: docs/decisions/010-sdpa-without-cudnn.md

The gathering helpers here (`gather_padded`, `gather_packed`) and the probe's tiny case
(`probe_case`) are shared by the other gather-based rungs (flash_attn's varlen path, xformers).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import defaults
from .base import AttentionBackend, Capabilities, ProbeResult, gather_kv, no_softcap
from .eager import causal_mask, reference_attention
from .metadata import StepMetadata, build_metadata


def _supports_enable_gqa() -> bool:
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: read the docstring
        return "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


SDPA_HAS_GQA = _supports_enable_gqa()


def gather_padded(cache: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
    """Every sequence's cached K or V, [B, max_kv, kv_heads, head_dim]; rows past a sequence's length are junk."""
    # only the max_kv_len rows are copied (indexing whole pages copied page_size rows per page: a
    # 256-token page per sequence per layer dominated CPU decode at batch 8)
    page_size, kvh, hd = cache.shape[1], cache.shape[2], cache.shape[3]
    key = ("padded_slots", page_size, cache.device)
    slots = meta.memo.get(key)
    if slots is None:  # once a step: every layer's K and V gather the same slots
        pos = torch.arange(meta.max_kv_len, device=cache.device)
        tables = meta.block_tables.to(cache.device).long()[:, pos // page_size]  # [B, max_kv]
        slots = (tables * page_size + pos % page_size).clamp_(min=0).reshape(-1)  # an unused (-1) page reads junk
        meta.memo[key] = slots
    return cache.view(-1, kvh, hd).index_select(0, slots).view(meta.batch_size, meta.max_kv_len, kvh, hd)


def gather_packed(cache: torch.Tensor, meta: StepMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sequence's cached K or V back to back, [sum(kv_lens), kv_heads, head_dim], and cu_kv_lens [B+1] int32."""
    page_size, kvh, hd = cache.shape[1], cache.shape[2], cache.shape[3]
    dev = cache.device
    kv_lens = meta.kv_lens.to(dev).long()
    total = int(sum(meta.kv_lens_host))
    cu = torch.zeros(meta.batch_size + 1, dtype=torch.int64, device=dev)
    cu[1:] = torch.cumsum(kv_lens, 0)
    seq = torch.repeat_interleave(torch.arange(meta.batch_size, device=dev), kv_lens, output_size=total)
    pos = torch.arange(total, device=dev) - cu[seq]
    slots = meta.block_tables.to(dev).long()[seq, pos // page_size] * page_size + pos % page_size
    return cache.view(-1, kvh, hd).index_select(0, slots), cu.to(torch.int32)


def padded_mask(meta: StepMetadata, window: int | None, device) -> torch.Tensor:
    """[B, 1, max_q, max_kv] bool: bottom-right causal (and windowed) per sequence; padded query rows see key 0 only."""
    q_lens = (meta.cu_q_lens[1:] - meta.cu_q_lens[:-1]).to(device).long()
    kv_lens = meta.kv_lens.to(device).long()
    i = torch.arange(meta.max_q_len, device=device)
    j = torch.arange(meta.max_kv_len, device=device)
    qpos = (kv_lens - q_lens)[:, None] + i[None, :]  # [B, Q] absolute position of each query row
    mask = j[None, None, :] <= qpos[:, :, None]
    if window is not None:
        mask &= j[None, None, :] > (qpos - window)[:, :, None]
    padded_row = (i[None, :] >= q_lens[:, None])[:, :, None]  # a fully masked row would give NaN
    mask |= padded_row & (j == 0)[None, None, :]
    return mask[:, None]


def without_cudnn(device: torch.device):
    """A context in which sdpa may use every kernel family torch has enabled except cuDNN (on CUDA,
    where cuDNN is enabled; elsewhere nothing changes), and not flash attention on a GPU run as an
    sm_70 / sm_75 one (LOWGEAR_EMULATE_SM, ops/emulate.py): torch's flash kernels need sm_80."""
    from ..platform.hardware import emulated_capability

    b = torch.backends.cuda
    old_gpu = emulated_capability() is not None
    if device.type != "cuda" or not (b.cudnn_sdp_enabled() or old_gpu):
        return contextlib.nullcontext()
    allowed = [kind for kind, on in ((SDPBackend.FLASH_ATTENTION, b.flash_sdp_enabled() and not old_gpu),
                                     (SDPBackend.EFFICIENT_ATTENTION, b.mem_efficient_sdp_enabled()),
                                     (SDPBackend.MATH, b.math_sdp_enabled())) if on]
    return sdpa_kernel(allowed) if allowed else contextlib.nullcontext()


def sdpa(q, k, v, scale: float, mask=None, causal: bool = False, expand_kv: bool = False) -> torch.Tensor:
    """q [B, H, Q, D], k/v [B, KVH, K, D] -> [B, H, Q, D]; GQA by enable_gqa where torch has it, else by repeating kv heads."""
    group = q.shape[1] // k.shape[1]
    kwargs = {}
    if group > 1:
        if SDPA_HAS_GQA and not expand_kv:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, **kwargs)


class SdpaBackend(AttentionBackend):
    name = "sdpa"
    # Not capturable: the padded decode call is static-shape only at a fixed max_kv_len bound, and at
    # the cache's capacity that gathers [B, capacity] keys and values per layer and step.
    capabilities = Capabilities(min_compute_capability=(5, 0), capturable=False,
                                kv_dtypes=defaults.KV_CACHE_DTYPES)
    probe_device: torch.device | None = None  # tests: run the probe's tensors here instead

    def __init__(self, batched: str = "decode"):
        # "decode": one padded call for decode steps, per-sequence calls otherwise; "always" / "never".
        self.batched = batched
        # The memory-efficient kernel takes masks but not enable_gqa on some torch versions, so on
        # CUDA with a mask the kv heads are repeated to keep that kernel usable.
        self.expand_kv_with_mask = False
        # torch devices whose sdpa has no flash kernel (compute capability < 8.0, from the probe's
        # DeviceInfo): there enable_gqa would send a causal prefill to the math kernel, which
        # materializes every [q, k] score, so kv heads are repeated and the memory-efficient kernel
        # serves it (why: docs/decisions/011-sdpa-repeat-kv-heads-below-sm80.md)
        self._no_flash: set[torch.device] = set()

    def attend(self, q, k_cache, v_cache, meta: StepMetadata, scale, window, softcap=None):
        no_softcap(self, softcap)  # torch's sdpa has no score hook: soft-capped models take another rung
        use_batched = self.batched == "always" or (self.batched == "decode" and meta.is_decode)
        with without_cudnn(q.device):
            if use_batched and meta.batch_size > 0:
                return self._attend_padded(q, k_cache, v_cache, meta, scale, window)
            return self._attend_each(q, k_cache, v_cache, meta, scale, window)

    def _expand(self, has_mask: bool, device: torch.device) -> bool:
        if device.type != "cuda":
            return has_mask and self.expand_kv_with_mask
        return has_mask or device in self._no_flash or not torch.backends.cuda.flash_sdp_enabled()

    def _attend_padded(self, q, k_cache, v_cache, meta, scale, window):
        B, T = meta.batch_size, q.shape[0]
        heads, hd = q.shape[1], q.shape[2]
        dev = q.device
        if meta.is_decode:
            qp = q.view(B, 1, heads, hd)
        else:
            q_lens = (meta.cu_q_lens[1:] - meta.cu_q_lens[:-1]).to(dev).long()
            seq = torch.repeat_interleave(torch.arange(B, device=dev), q_lens, output_size=T)
            row = torch.arange(T, device=dev) - meta.cu_q_lens.to(dev).long()[seq]
            qp = q.new_zeros(B, meta.max_q_len, heads, hd)
            qp[seq, row] = q
        k = gather_padded(k_cache, meta).to(q.dtype)  # [B, K, KVH, D]
        v = gather_padded(v_cache, meta).to(q.dtype)
        key = ("padded_mask", window, dev)
        mask = meta.memo.get(key)
        if mask is None:  # once a step per window: the layers share it
            mask = meta.memo[key] = padded_mask(meta, window, dev)
        out = sdpa(qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, mask, expand_kv=self._expand(True, dev))
        out = out.transpose(1, 2)  # [B, Q, H, D]
        return out.reshape(T, heads, hd) if meta.is_decode else out[seq, row]

    def _attend_each(self, q, k_cache, v_cache, meta, scale, window):
        out = torch.empty_like(q)
        start = 0
        for s, (q_len, kv_len) in enumerate(zip(meta.q_lens_host, meta.kv_lens_host)):
            k = gather_kv(k_cache, meta.block_tables[s], kv_len).to(q.dtype).transpose(0, 1)[None]
            v = gather_kv(v_cache, meta.block_tables[s], kv_len).to(q.dtype).transpose(0, 1)[None]
            qs = q[start : start + q_len].transpose(0, 1)[None]  # [1, H, q_len, D]
            if q_len == kv_len and (window is None or window >= kv_len):
                o = sdpa(qs, k, v, scale, causal=True, expand_kv=self._expand(False, q.device))
            else:
                mask = causal_mask(q_len, kv_len, window, q.device)
                o = sdpa(qs, k, v, scale, mask, expand_kv=self._expand(True, q.device))
            out[start : start + q_len] = o[0].transpose(0, 1)
            start += q_len
        return out

    def _probe(self, device, dtype: torch.dtype | None = None) -> ProbeResult:
        dev = self.probe_device or device.torch_device
        if device.kind == "cuda" and (device.compute_capability or (0, 0)) < (8, 0):
            self._no_flash.add(torch.device(device.torch_device))
        dtype = dtype or (torch.float32 if dev.type == "cpu" else torch.float16)
        case = probe_case(dev, dtype)
        for path in (self._attend_each, self._attend_padded):
            with without_cudnn(dev):
                out = path(case.q, case.k_cache, case.v_cache, case.meta, case.scale, None)
            err = case.check(out)
            if err:
                return ProbeResult(False, f"probe gave wrong results ({path.__name__.strip('_')}): {err}")
        return ProbeResult(True, f"probe call ok; {_kernel_families(device, dev)}", details={"kernels": _kernel_families(device, dev)})


def _kernel_families(device, dev: torch.device) -> str:
    """Which of sdpa's kernel families torch allows here (flash needs sm_80 inside torch too)."""
    if dev.type != "cuda":
        return "cpu kernels (flash-style and math)"
    fams = []
    cc = device.compute_capability or (0, 0)
    b = torch.backends.cuda
    if cc >= (8, 0) and b.flash_sdp_enabled():
        fams.append("flash")
    if b.mem_efficient_sdp_enabled():
        fams.append("memory-efficient")
    if b.math_sdp_enabled():
        fams.append("math")
    skipped = " (cuDNN left out: a graph per new length)" if b.cudnn_sdp_enabled() and cc >= (8, 0) else ""
    return "sdpa kernels: " + ", ".join(fams or ["none enabled"]) + skipped


@dataclass
class ProbeCase:
    """A tiny step (two sequences, one prefill chunk and one decode token, GQA, a page boundary) and its float64 answer."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: StepMetadata
    scale: float
    expected: torch.Tensor

    def check(self, out: torch.Tensor) -> str | None:
        if out.shape != self.expected.shape:
            return f"output shape {tuple(out.shape)}, expected {tuple(self.expected.shape)}"
        got = out.double().cpu()
        if not torch.isfinite(got).all():
            return "non-finite output"
        err = (got - self.expected).abs().max().item()
        tol = 1e-3 if out.dtype == torch.float32 else 3e-2
        return None if err <= tol else f"max error {err:.3g} against the float64 reference"


def probe_case(device: torch.device, dtype: torch.dtype, page_size: int = 16, decode_only: bool = False) -> ProbeCase:
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim = 4, 2, 64
    q_lens, kv_lens = ([1, 1], [page_size + 3, 7]) if decode_only else ([3, 1], [page_size + 3, 7])
    tables = [[2, 0], [1]]
    pages = 3
    k_cache = torch.randn(pages, page_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(pages, page_size, kv_heads, head_dim, generator=gen)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=gen)
    meta = build_metadata(q_lens, kv_lens, tables, page_size)
    scale = head_dim**-0.5
    expected = reference_attention(q, k_cache, v_cache, meta, scale)
    return ProbeCase(
        q.to(device, dtype),
        k_cache.to(device, dtype),
        v_cache.to(device, dtype),
        meta.to(device),
        scale,
        expected,
    )
