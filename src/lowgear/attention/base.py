"""What every attention backend declares and does.

A backend states its capabilities (paged KV, variable-length batches, dtypes, minimum compute
capability, GQA, sliding window, attention-logit soft-capping) and exposes `probe(device)`, which runs a tiny *real* call and
returns a `ProbeResult`. A package that imports but whose kernels fail is unavailable, with the
error as the reason. `forward` writes this step's new keys and values into the paged cache and
returns the attention output for every new token; all backends compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops.kv_write import restore_output, rotate_query, write_kv
from .metadata import StepMetadata


@dataclass(frozen=True)
class Capabilities:
    paged: bool = True  # reads K/V through block tables
    varlen: bool = True  # batches of sequences with unequal lengths in one call
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
    min_compute_capability: tuple[int, int] | None = None  # None: no GPU needed
    gqa: bool = True
    sliding_window: bool = True
    # scores soft-capped as cap * tanh(scores / cap) before the softmax (gemma2's attn_logit_softcapping);
    # a model that needs it never runs on a rung without it (attention/select.py skips the rung)
    softcap: bool = False
    cpu: bool = True  # can run on the CPU
    package: str | None = None  # the kernel library it imports, if any
    # Decode steps, and steps of a fixed q_len per row (speculative checks), can be captured in a CUDA graph:
    # those paths read lengths only from device tensors (never q_lens_host / kv_lens_host), take max_q_len and
    # max_kv_len as fixed bounds, make no host sync.
    capturable: bool = False
    # KV cache storage it reads: "auto" (the model dtype); ops/kv_write.KV_DTYPES for 8-bit pages
    kv_dtypes: tuple[str, ...] = ("auto",)


@dataclass(frozen=True)
class ProbeResult:
    available: bool
    reason: str = ""
    seconds: float | None = None  # time of the probe's timed call, where it times one
    details: dict = field(default_factory=dict)


def gather_kv(cache: torch.Tensor, table: torch.Tensor, kv_len: int) -> torch.Tensor:
    """One sequence's cached keys or values, [kv_len, kv_heads, head_dim], gathered from its pages."""
    page_size = cache.shape[1]
    n_pages = (kv_len + page_size - 1) // page_size
    return cache.index_select(0, table[:n_pages].long()).flatten(0, 1)[:kv_len]


class AttentionBackend:
    """Base class: subclasses set `name`, `capabilities` and implement `_probe` and `attend`."""

    name: str = "?"
    capabilities: Capabilities = Capabilities()

    def probe(self, device) -> ProbeResult:
        """Run a tiny real call on `device` (a hardware.DeviceInfo); never raises."""
        try:
            return self._probe(device)
        except Exception as exc:  # a broken kernel package must not take the process down
            return ProbeResult(False, f"probe call failed: {type(exc).__name__}: {exc}".strip())

    def _probe(self, device) -> ProbeResult:
        raise NotImplementedError

    def forward(
        self,
        q: torch.Tensor,  # [T, heads, head_dim]
        k: torch.Tensor,  # [T, kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [pages, page_size, kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: StepMetadata,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:  # [T, heads, head_dim]
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        # (a quantized cache's frame, ops/kv_write.py: q into it, the output out of it; `attend` reads stored values)
        out = self.attend(rotate_query(q, k_cache), k_cache, v_cache, meta, scale, window, softcap)
        return restore_output(out, v_cache)

    def attend(self, q, k_cache, v_cache, meta: StepMetadata, scale: float, window: int | None,
               softcap: float | None = None) -> torch.Tensor:
        raise NotImplementedError


def no_softcap(backend: AttentionBackend, softcap: float | None) -> None:
    """For rungs that cannot soft-cap: the selector never gives them such a model; a direct call says so."""
    if softcap:
        raise ValueError(f"the {backend.name} attention rung cannot soft-cap attention scores; use eager, triton or flash_attn")
