"""The flash_attn rung: FlashAttention-2 kernels, for sm_80 and newer GPUs.

Imported lazily and only on a device that could run it: on sm < 80 the rung is skipped before the
package is touched. Decode steps read the paged cache in place through `flash_attn_with_kvcache`'s
block_table (flash-attn >= 2.5.7, pages a multiple of 256 tokens); every other step, and older
flash-attn, gathers K/V and calls `flash_attn_varlen_func` (bottom-right causal since 2.1). Both take
`softcap` (attention-logit soft-capping) from flash-attn 2.6.0, the version the rung declares it from.
"""

from __future__ import annotations

import importlib
import re

import torch

from .base import AttentionBackend, Capabilities, ProbeResult
from .metadata import StepMetadata
from .sdpa import gather_packed, probe_case

PAGED_MIN_VERSION = (2, 5, 7)
SOFTCAP_MIN_VERSION = (2, 6, 0)
PAGED_PAGE_MULTIPLE = 256


def parse_version(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def package_version(module) -> str | None:
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as dist_version

        return dist_version("flash-attn")
    except Exception:
        return None


def needs_sm(device, cc: tuple[int, int]) -> str | None:
    """The skip reason when `device` is below `cc` (or is no GPU); None when it qualifies."""
    if device.kind != "cuda":
        return "needs a CUDA GPU"
    have = device.compute_capability or (0, 0)
    if have < cc:
        return f"needs sm_{cc[0]}{cc[1]} (device is sm_{have[0]}{have[1]})"
    return None


def window_size(window: int | None) -> tuple[int, int]:
    return (-1, -1) if window is None else (window - 1, 0)


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"
    capabilities = Capabilities(
        paged=True,
        dtypes=(torch.float16, torch.bfloat16),
        min_compute_capability=(8, 0),
        cpu=False,
        package="flash_attn",
    )
    probe_device: torch.device | None = None  # tests: run the probe's tensors here instead

    def __init__(self):
        self._fa = None
        self.version: tuple[int, ...] = ()

    def capabilities_for(self, device) -> Capabilities:
        """Soft-capping where the installed flash-attn has it (read from its metadata, not imported)."""
        from dataclasses import replace

        try:
            from importlib.metadata import version as dist_version

            installed = parse_version(dist_version("flash-attn"))
        except Exception:
            installed = ()
        return replace(self.capabilities, softcap=installed >= SOFTCAP_MIN_VERSION)

    @property
    def paged_native(self) -> bool:
        return self.version >= PAGED_MIN_VERSION

    def _module(self):
        if self._fa is None:
            fa = importlib.import_module("flash_attn")
            self.version = parse_version(package_version(fa))
            self._fa = fa
        return self._fa

    def attend(self, q, k_cache, v_cache, meta: StepMetadata, scale, window, softcap=None):
        fa = self._module()
        T, heads, hd = q.shape
        capped = {"softcap": softcap} if softcap else {}  # older flash-attn has no such argument
        if meta.is_decode and self.paged_native and meta.page_size % PAGED_PAGE_MULTIPLE == 0:
            out = fa.flash_attn_with_kvcache(
                q.view(T, 1, heads, hd),
                k_cache,
                v_cache,
                cache_seqlens=meta.kv_lens,
                block_table=meta.block_tables,
                softmax_scale=scale,
                causal=True,
                window_size=window_size(window),
                **capped,
            )
            return out.view(T, heads, hd)
        k, cu_k = gather_packed(k_cache, meta)
        v, _ = gather_packed(v_cache, meta)
        return fa.flash_attn_varlen_func(
            q,
            k.to(q.dtype),
            v.to(q.dtype),
            meta.cu_q_lens,
            cu_k,
            meta.max_q_len,
            meta.max_kv_len,
            softmax_scale=scale,
            causal=True,
            window_size=window_size(window),
            **capped,
        )

    def _probe(self, device, dtype: torch.dtype | None = None) -> ProbeResult:
        reason = needs_sm(device, self.capabilities.min_compute_capability)
        if reason and self.probe_device is None:
            return ProbeResult(False, reason)
        dtype = dtype or torch.float16
        if dtype not in self.capabilities.dtypes:
            return ProbeResult(False, f"does not run in {str(dtype).removeprefix('torch.')}")
        try:
            self._module()
        except ImportError as exc:
            return ProbeResult(False, f"flash_attn not importable: {exc}")
        dev = self.probe_device or device.torch_device
        page = PAGED_PAGE_MULTIPLE if self.paged_native else 16
        for case in (probe_case(dev, dtype, page_size=page, decode_only=True), probe_case(dev, dtype, page_size=16)):
            err = case.check(self.attend(case.q, case.k_cache, case.v_cache, case.meta, case.scale, None))
            if err:
                return ProbeResult(False, f"probe gave wrong results: {err}")
        version = ".".join(map(str, self.version)) or "unknown"
        paged = "paged via block_table" if self.paged_native else f"not paged-capable (< {'.'.join(map(str, PAGED_MIN_VERSION))}): gathers K/V"
        return ProbeResult(True, f"flash-attn {version}, probe call ok; {paged}", details={"version": version, "paged": self.paged_native})
