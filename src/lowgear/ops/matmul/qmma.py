"""Batched-decode 4/8-bit matmul on tensor cores for sm_75+: a CUDA C kernel (`qmma.cu`) built by NVRTC.

Why not Triton: on sm_75 Triton lowers tl.dot to FMAs, and on sm_80+ its tl.dot kernel (gptq_mma.py) pays
per tile for moving the codes into the mma operand layout (decision 024). Here every lane loads exactly the
codes of its own mma fragment, so no code tile is rearranged through shared memory:

    block (256 output features, K-split s)    4 warps x 64 features, all over the same K-slice
      x[:, slice] -> shared memory, in the fragment's K order, with each chunk's row sums
      per chunk of 4 * PACK features, per lane:  word row t of its 8 features (two 16-byte loads; RING chunks
          in flight through a per-warp cp.async ring on sm_80+, STAGES in registers on sm_75), 8 codes ->
          4 half2 (mask, OR into 1024's mantissa, one fma) -> 4 mma tiles
      at each group's end:  acc += scale * p - scale * zero * sum(x)      (codes exact in the mma)
      split-K partials as the Triton kernels' (`splitk.py`): the last block of a column adds them in order

The 16 x 8 x 16 mma (two 16 x 8 x 8 on sm_75) takes the weights as its 16-row operand and x's rows as its
8 columns, so one to eight decode rows cost the same mma work (MT = 2 tiles serve 9-16 rows).

17-64 rows (MT = 4 or 8 tiles, fp16) take the DQ build: a second set of accumulators for the fold would not
fit beside that many tiles, so each code pair becomes a weight pair, fma(q, scale, -zero * scale) in half2,
before the mma (the rounding of the weights to fp16 that the tl.dot kernel and cuBLAS prefill also make),
and x's slice may use the shared memory the device lends a block beyond 48 KB (fewer K splits to add up).

Serves the GPTQ form of GPTQ, AWQ and GGUF layers (Q4_0 / Q4_1 / Q4_K at 4 bits; Q5_x / Q6_K / Q8_0 at 8) when:
codes of 4 or 8 bits, groups a multiple of the chunk (32 features at 4 bits, 16 at 8; or one group), no
act-order permutation, N a multiple of 8, fp16 activations (bf16 at 4 bits on sm_80+, up to 16 rows), 1-64 rows.
gptq_matmul sends it QMMA_FROM_M = 4 to ROUTE_MAX_M rows (the GEMV is faster below;
docs/decisions/026-mma-sync-decode.md).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from ...formats.gptq import gptq_groups, zero_row
from .. import nvrtc, pdl
from ...platform import env
from . import splitk

MAX_M = 64  # what the kernel takes
FOLD_MAX_M = 16  # past it the DQ build (fp16 only)
# what gptq_matmul sends it: the DQ build (17-64 rows) is routed once a GPU run has timed it against the tl.dot
# kernel (docs/decisions/026-mma-sync-decode.md); until then 17-64 rows stay there
ROUTE_MAX_M = 16
BITS = (4, 8)
MIN_CAPABILITY = (7, 5)  # the m16n8k8 mma
WARPS = 4
STAGES = 2
# blocks to aim for per SM (each holds STAGES chunks x 4 KB of codes in flight)
BLOCKS_PER_SM = 2
# blocks an SM must be able to hold (the register cap ptxas works to)
MIN_BLOCKS = 1
# sm_80+: chunks come through a shared-memory ring filled by cp.async, RING chunks (2 KB each) in flight a
# warp, and x's slice is kept under ASYNC_X_BYTES so that a few blocks share an SM
ASYNC_FROM = (8, 0)
RING = 6
ASYNC_X_BYTES = 24 * 1024
# the split-K sum split-major (every row's loads of 4 splits in flight) rather than row by row: the DQ build's;
# the 4-16-row builds keep the row-by-row sum until an A/B times it (docs/decisions/026-mma-sync-decode.md)
SPLIT_MAJOR_SUM = False
# sm_80+ (the cp.async ring): a persistent grid, each block taking column blocks blockIdx.x, + gridDim.x, ... of its
# K split with x's slice staged once and its ring running on across them, PERSIST_BLOCKS_PER_SM blocks an SM over
# the splits (one wave; the kernel's 135-140 registers and ring + slice hold 3 an SM on an H100). Written for
# the 4-16-row builds' two waves (docs/decisions/026-mma-sync-decode.md); off until a GPU run times it
PERSISTENT = False
PERSIST_BLOCKS_PER_SM = 3
# x's slice staged in shared memory stays under this (no opt-in above 48 KB, as a T4's 64 KB SM needs)
SMEM_BYTES = 48 * 1024


_DISABLED: list[str] = []  # why the kernel was turned off in this process (a failed build or load)


def off_reason() -> str | None:
    """Why the kernel is off in this process (LOWGEAR_NO_QMMA, a failed build or load, no NVRTC), or None."""
    if env.flag("LOWGEAR_NO_QMMA"):
        return "LOWGEAR_NO_QMMA=1"
    if _DISABLED:
        return _DISABLED[0].splitlines()[0]
    return _nvrtc_missing()


def usable() -> bool:
    return off_reason() is None


def decision(capability: tuple[int, int] | None) -> str:
    """What doctor says about this kernel on a CUDA device of this compute capability."""
    from .gptq_gemv import QMMA_FROM_M

    if capability is None or tuple(capability) < MIN_CAPABILITY:
        return "off: sm_75+ has the m16n8k8 mma (below it the GEMV, then dequantize + cuBLAS)"
    why = off_reason()
    if why is not None:
        return f"off: {why}"
    ring = ", cp.async ring" if tuple(capability) >= ASYNC_FROM else ""
    return f"{QMMA_FROM_M}-{ROUTE_MAX_M} rows on tensor cores (mma.sync built by NVRTC{ring})"


@lru_cache(maxsize=1)
def _nvrtc_missing() -> str | None:  # looked up once (a missing library would be searched for on every call)
    return nvrtc.available()


def disable(reason: str) -> None:
    """Stop using the kernel in this process (the callers' Triton routes take over), saying why once."""
    if not _DISABLED:
        import warnings

        warnings.warn(f"lowgear: the mma.sync decode kernel is off for this process ({reason.splitlines()[0]}); "
                      "batched 4-bit decode falls back to the Triton kernels", RuntimeWarning, stacklevel=3)
    _DISABLED.append(reason)


@lru_cache(maxsize=1)
def source() -> str:
    with open(os.path.join(os.path.dirname(__file__), "qmma.cu")) as f:
        return f.read()


def chunk(bits: int) -> int:
    return 4 * (32 // bits)


def serves(m: int, k: int, n: int, bits: int, group_size: int, dtype: torch.dtype, capability, sorted_: bool) -> bool:
    """Whether `qmma` can take this call (see the module docstring)."""
    if capability is None or tuple(capability) < MIN_CAPABILITY or bits not in BITS or sorted_ or not 1 <= m <= MAX_M:
        return False
    if dtype == torch.bfloat16:
        if bits != 4 or tuple(capability) < (8, 0) or m > FOLD_MAX_M:
            return False
    elif dtype != torch.float16:
        return False
    sc = chunk(bits)
    gs = k if gptq_groups(k, group_size) == 1 else group_size
    return n % 8 == 0 and k % sc == 0 and gs % sc == 0


def smem_bytes(m_tiles: int, k_per_split: int, bits: int, ring_bytes: int = 0) -> int:
    """x's staged slice, its chunk sums (not in the DQ build), and the cp.async ring (qmma.cu's layout)."""
    sc = chunk(bits)
    pad = ((2 * sc - (2 * k_per_split) % 128) + 128) % 128 // 2
    xr = 8 * m_tiles
    sums = 0 if m_tiles > 2 else ((k_per_split // sc) * xr * 4 + 15) // 16 * 16
    return (xr * (k_per_split + pad) * 2 + 15) // 16 * 16 + sums + ring_bytes


def launch_params(m: int, n: int, k: int, bits: int, sms: int, *, warps: int | None = None, split: int | None = None,
                  stages: int | None = None, blocks_per_sm: int | None = None, min_blocks: int | None = None,
                  use_async: bool | None = None, ring: int | None = None, x_bytes: int | None = None,
                  persistent: bool | None = None, grid_x: int | None = None, smem_optin: int = SMEM_BYTES,
                  capability: tuple[int, int] = (9, 0)) -> dict[str, int]:
    """MT, WARPS, STAGES, DQ, PERSIST, the K split and its slice, and the grid's column blocks (grid_x) for one
    shape (keywords: the benchmark's sweep). smem_optin: the shared memory the device lends one block (its x
    slice may take what the ring leaves of it from 17 rows on, on sm_80+)."""
    sc = chunk(bits)
    mt = 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8
    dq = mt > 2
    warps = warps or WARPS
    n_blocks = -(-n // (64 * warps))
    chunks = k // sc
    if split is None:  # DQ's blocks hold large slices: one an SM
        split = max(1, -(-(blocks_per_sm or (1 if dq else BLOCKS_PER_SM)) * sms // n_blocks))
    split = max(1, min(chunks, split))
    use_async = tuple(capability) >= ASYNC_FROM if use_async is None else use_async
    ring = (ring or RING) if use_async else 0
    x_budget = ASYNC_X_BYTES if use_async else SMEM_BYTES
    if dq and use_async:
        x_budget = max(x_budget, smem_optin - warps * ring * 2048 - 1024)
    x_budget = x_bytes or x_budget
    while True:  # the slice's x must fit the shared-memory budget
        kps = -(-chunks // split) * sc
        if smem_bytes(mt, kps, bits) <= x_budget or kps == sc:
            break
        split += 1
    split = -(-k // kps)
    persist = bool(use_async and (PERSISTENT if persistent is None else persistent))
    if not persist:
        grid_x = n_blocks
    else:  # each block of a split takes every grid_x-th column block (grid_x: the tests' override)
        grid_x = max(1, min(n_blocks, grid_x or PERSIST_BLOCKS_PER_SM * sms // split))
    return {"MT": mt, "DQ": int(dq), "WARPS": warps, "STAGES": stages or STAGES, "MINB": min_blocks or MIN_BLOCKS,
            "ASYNC": int(use_async), "RING": ring or RING, "PERSIST": int(persist), "split": split,
            "k_per_split": kps, "n_blocks": n_blocks, "grid_x": grid_x,
            "smem": smem_bytes(mt, kps, bits, warps * ring * 2048)}


@lru_cache(maxsize=16)
def _sms(index: int) -> tuple[int, int]:
    """The device's multiprocessors, and the shared memory it lends one block."""
    p = torch.cuda.get_device_properties(index)
    return p.multi_processor_count, getattr(p, "shared_memory_per_block_optin", SMEM_BYTES)


def qmma(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int,
         group_size: int, capability: tuple[int, int], split_major: bool | None = None, **overrides) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W.T on a CUDA device (`serves` must hold); the operands are the GPTQ GEMV's
    (qweight [K / PACK, N] int32, zeros `float_zeros` fp16 [groups, N] or [1, N], scales fp16). capability: the
    target the kernel is built for (the device's, or the emulated one's). split_major: the split-K sum's form
    (default: SPLIT_MAJOR_SUM, always with DQ); overrides: launch_params' keywords (persistent=True: the
    persistent grid on sm_80+)."""
    m, k = x.shape
    n = qweight.shape[1]
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.contiguous()
    gs = k if gptq_groups(k, group_size) == 1 else group_size
    sms, optin = _sms(x.device.index or 0)
    p = launch_params(m, n, k, bits, sms, smem_optin=optin, capability=tuple(capability), **overrides)
    launch = pdl.launch(x.device, m) if tuple(capability) >= (9, 0) else {"PDL": 0}
    defines = {"BITS": bits, "MT": p["MT"], "DQ": p["DQ"], "WARPS": p["WARPS"], "STAGES": p["STAGES"],
               "MINB": p["MINB"], "ASYNC": p["ASYNC"], "RING": p["RING"],
               "BF16": int(x.dtype == torch.bfloat16), "PDL": launch["PDL"], "PERSIST": p["PERSIST"],
               "SPLITMAJ": int(p["DQ"] or (SPLIT_MAJOR_SUM if split_major is None else split_major))}
    if zero_row(zeros, k, group_size):  # one zero row for every group (only then defined: other builds unchanged)
        defines["ZROW"] = 1
    kern = nvrtc.kernel(source(), "qmma_kernel", defines, x.device, tuple(capability))
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    part = splitk.workspace(p["split"], m, n, x.device)
    cnt = splitk.counters(x.device, p["n_blocks"])
    kern((p["grid_x"], p["split"], 1), 32 * p["WARPS"], p["smem"],
         [x, qweight, zeros, scales, y, part, cnt, m, n, k, x.stride(0), p["k_per_split"], gs], pdl=bool(launch["PDL"]))
    return y
