"""The triton rung: lowgear's own paged attention kernels, for GPUs that flash-attn does not serve.

Decode steps (one new token per sequence) go to a split-K decode kernel whose FMA form (split-D:
head_dim over a few lanes, positions over the rest of the warp) needs no `tl.dot`, so it runs near
memory speed on sm_70/sm_75 as on newer GPUs (on sm_80+, for fp16 / bf16, the same kernel's tl.dot
form, which puts a kv head's query heads through tensor cores); every other step (prefill,
chunked prefill, mixed prefill+decode batches) goes to a paged prefill kernel that does use
`tl.dot`. Triton compiles `tl.dot` to tensor cores only on sm_80+, so below that the prefill half
of this rung runs on CUDA cores: `prefers_sdpa_prefill_below_sm80` tells the model/selector to send
prefill to sdpa there and keep this rung for decode.

A quantized KV cache (ops/kv_write.QuantizedKV: int8, fp8_e4m3 or int4 codes with a float32 scale
per token and head) takes the same routes: decode steps to the split-K decode kernel (in the form
the device would take for the model dtype: tl.dot from sm_80 for fp16 / bf16, else the FMA form),
everything else to the prefill kernel; both decode the codes as they load each tile.

Triton is imported only inside functions (never at lowgear import time). On the CPU the rung runs
in Triton's interpreter, and only when TRITON_INTERPRET=1 is set (tests); on a GPU the rung needs
ops/dispatch.py's Triton decision for the device (the one the model's ops come from), then runs
both kernels once to compile them, then times a second tiny call and checks it against eager.
"""

from __future__ import annotations

import time

import torch

from .. import defaults
from ..errors import install_hint
from ..ops.dispatch import MIN_COMPUTE_CAPABILITY, triton_eligibility
from ..platform import env
from .base import AttentionBackend, Capabilities, ProbeResult
from .eager import reference_attention
from .metadata import StepMetadata, build_metadata

# A tiny call that takes longer than this after compiling means a broken or crawling kernel
# (what `tl.dot` is reported to do on some sm_70 setups), not a slow GPU.
PROBE_MAX_SECONDS = 2.0
KV_STORAGE = defaults.KV_CACHE_DTYPES  # the model dtype, or 8- / 4-bit pages dequantized in both kernels
_PROBE_TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4}


def _interpret() -> bool:
    return env.get("TRITON_INTERPRET") == "1"


def dtypes_for(compute_capability: tuple[int, int] | None) -> tuple[torch.dtype, ...]:
    """The dtypes the kernels run in on a device: bf16 needs sm_80+; the interpreter has no bf16."""
    if compute_capability is None:
        return (torch.float32, torch.float16)
    if compute_capability >= (8, 0):
        return (torch.float16, torch.bfloat16, torch.float32)
    return (torch.float16, torch.float32)


class _CapabilitiesNow:
    """`capabilities` as a class-level fact that reads TRITON_INTERPRET when asked, not at import."""

    def __get__(self, obj, owner) -> Capabilities:
        return Capabilities(
            paged=True,
            varlen=True,
            dtypes=(torch.float16, torch.bfloat16, torch.float32),
            min_compute_capability=MIN_COMPUTE_CAPABILITY,
            gqa=True,
            sliding_window=True,
            softcap=True,
            cpu=_interpret(),
            package="triton",
            capturable=True,
            kv_dtypes=KV_STORAGE,
        )


class TritonBackend(AttentionBackend):
    name = "triton"
    capabilities = _CapabilitiesNow()
    # The prefill kernel's tl.dot has no tensor cores below sm_80: sdpa is faster there.
    prefers_sdpa_prefill_below_sm80 = True
    # The decode kernel's FMA form (no tl.dot) runs on every compute capability; on sm_80+ fp16 / bf16
    # decode takes its tl.dot form (tensor cores there; below sm_80 Triton lowers tl.dot to FMAs).
    decode_dot_from = (8, 0)

    def __init__(self) -> None:
        self._sm_counts: dict[int, int] = {}  # CUDA index -> SM count, learned from probe()
        self._dot_devices: set[int] = set()  # CUDA indices whose decode takes the tl.dot form

    def capabilities_for(self, device) -> Capabilities:
        """The capabilities on one device (a hardware.DeviceInfo): dtypes narrowed to what it runs."""
        caps = self.capabilities
        cc = device.compute_capability if device.kind == "cuda" else None
        return Capabilities(
            paged=caps.paged,
            varlen=caps.varlen,
            dtypes=dtypes_for(cc),
            min_compute_capability=caps.min_compute_capability,
            gqa=caps.gqa,
            sliding_window=caps.sliding_window,
            softcap=caps.softcap,
            cpu=caps.cpu,
            package=caps.package,
            capturable=caps.capturable,
            kv_dtypes=caps.kv_dtypes,
        )

    def _probe(self, device) -> ProbeResult:
        try:
            import triton  # noqa: F401
        except ImportError:
            return ProbeResult(False, f"triton is not installed: {install_hint('triton')}")
        if device.kind == "cpu":
            if not _interpret():
                return ProbeResult(False, "Triton needs a CUDA GPU; set TRITON_INTERPRET=1 to run it in the interpreter")
            return self._timed_probe(device, torch.float32, time_limit=None)
        if device.simulated:
            return ProbeResult(False, f"{device.name} is a simulated profile: no kernel can run on it")
        eligible = triton_eligibility(device)  # the one decision the model's ops come from
        if not eligible.triton:
            return ProbeResult(False, eligible.reason)
        cc = device.compute_capability
        if device.sm_count:
            self._sm_counts[device.index] = device.sm_count
        if cc >= self.decode_dot_from:
            self._dot_devices.add(device.index)
        return self._timed_probe(device, torch.float16, time_limit=PROBE_MAX_SECONDS)

    def _timed_probe(self, device, dtype: torch.dtype, time_limit: float | None) -> ProbeResult:
        """Compile both kernels on a tiny step, then time a second call and check it against eager."""
        dev = device.torch_device
        gen = torch.Generator().manual_seed(0)
        heads, kv_heads, head_dim, page_size = 4, 2, 64, 16
        k_cache = torch.randn(8, page_size, kv_heads, head_dim, generator=gen).to(dev, dtype)
        v_cache = torch.randn(8, page_size, kv_heads, head_dim, generator=gen).to(dev, dtype)
        tables = [[3, 5], [7]]
        steps = [
            build_metadata([5, 3], [21, 3], tables, page_size, device=dev),  # prefill kernel
            build_metadata([1, 1], [22, 4], tables, page_size, device=dev),  # decode kernel
        ]
        queries = [torch.randn(m.num_tokens, heads, head_dim, generator=gen).to(dev, dtype) for m in steps]
        scale = head_dim**-0.5

        def run_all():
            outs = [self.attend(q, k_cache, v_cache, m, scale, None) for q, m in zip(queries, steps)]
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return outs

        run_all()  # compiles (or, in the interpreter, warms up)
        start = time.perf_counter()
        outs = run_all()
        seconds = time.perf_counter() - start
        if time_limit is not None and seconds > time_limit:
            return ProbeResult(
                False,
                f"pathologically slow: a tiny call took {seconds:.2f} s after compiling (limit {time_limit:.0f} s)",
                seconds=seconds,
            )
        for name, q, m, out in zip(("prefill", "decode"), queries, steps, outs):
            ref = reference_attention(q, k_cache, v_cache, m, scale)
            err = (out.double() - ref).abs().max().item()
            if not err <= _PROBE_TOLERANCE[dtype]:
                return ProbeResult(False, f"{name} kernel disagrees with eager (max error {err:.3g})", seconds=seconds)
        cc = device.compute_capability if device.kind == "cuda" else None
        mode = "interpreter (CPU)" if device.kind == "cpu" else f"compiled for sm_{cc[0]}{cc[1]}"
        return ProbeResult(
            True,
            f"paged decode + prefill kernels, {mode}",
            seconds=seconds,
            details={
                "dtypes": [str(d).removeprefix("torch.") for d in dtypes_for(cc)],
                "prefill_prefers_sdpa": cc is not None and cc < (8, 0),
            },
        )

    def _target_programs(self, device: torch.device, per_sm: int) -> int:
        """Programs a decode launch aims for before it stops splitting contexts (per SM: each form's
        own, ops/attention/paged_decode.py's dot_programs_per_sm() and fma_form())."""
        if device.type != "cuda":
            return 8  # the interpreter runs programs one after another: fewer is faster
        return per_sm * self._sm_counts.get(device.index or 0, 64)

    def attend(self, q, k_cache, v_cache, meta: StepMetadata, scale: float, window: int | None,
               softcap: float | None = None) -> torch.Tensor:
        from ..ops.attention import load

        paged_decode, paged_prefill = load(_interpret())
        if q.stride(-1) != 1:
            q = q.contiguous()
        if meta.num_tokens == 0:
            return torch.empty_like(q)
        if meta.is_decode:  # float or quantized pages (QuantizedKV: decoded in the kernel, every form)
            use_dot = (q.device.type == "cuda" and (q.device.index or 0) in self._dot_devices
                       and k_cache.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] >= 16)
            return paged_decode.paged_decode(
                q, k_cache, v_cache, meta.block_tables, meta.kv_lens, scale, meta.max_kv_len,
                window=window, softcap=softcap, use_dot=use_dot,
                target_programs=self._target_programs(
                    q.device, paged_decode.dot_programs_per_sm(q.shape[0]) if use_dot else paged_decode.fma_form()[1]),
            )  # fmt: skip
        return paged_prefill.paged_prefill(
            q, k_cache, v_cache, meta.block_tables, meta.cu_q_lens, meta.kv_lens, scale, meta.max_q_len, window=window,
            softcap=softcap,
        )
