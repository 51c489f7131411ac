"""Split-K finishing inside the matmul kernel: the last program of an output tile adds the partials.

Decode matmuls split K so that a layer with few output tiles still spreads over every SM. Each
program of a tile writes its fp32 partial to a workspace [splits, M, N]; then it bumps the tile's
counter, and the program that finds every other split already counted (the last to finish) loads
all the partials and writes the output. So there is no second kernel: in a CUDA-graph decode step
that launch, and its serial walk over the splits, cost more than the sum itself (an 8B layer's
GEMV has 4 of them per layer). The sum runs in split order whichever program is last, so results
are deterministic (greedy decoding is reproducible, graph replays equal eager steps); the last
program also puts its counter back to 0, so the counters need zeroing only once, when allocated.

Ordering: every thread's partial store comes before the barrier, the barrier before one thread's
acq_rel atomic (release, cumulative over the CTA's writes it has seen through the barrier); the
last program's partial loads come after its acquire and bypass L1 (`.cg`). Counters live in one
int32 buffer per device (`counters`), shared by every layer: kernels of a stream run one after
another, and each leaves its counters at 0. Nothing here uses tl.dot (sm_70 / sm_75 safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# counters allocated per device at first use (grown outside graph capture if a launch needs more)
MIN_COUNTERS = 4096
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The device's zeroed int32 tile counters, at least `tiles` of them."""
    device = torch.device(device)
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split-K counters must be allocated before CUDA-graph capture "
                               "(run the step once eagerly first)")
        buf = _COUNTERS[device] = torch.zeros(max(MIN_COUNTERS, tiles), dtype=torch.int32, device=device)
    return buf


@triton.jit
def finish(acc, y_ptr, part_ptr, cnt_ptr, offs, mask, tile, pid_k, n_split, MN,
           S_CHUNK: tl.constexpr):
    """Write a program's tile result: y directly when n_split == 1, else through the partials.

    acc: this program's fp32 sums, offs/mask: their element offsets in a [M, N] output (also the
    offsets inside one split's [M, N] partial), tile: the output tile's counter index.
    """
    if n_split == 1:
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + pid_k * MN + offs, acc, mask=mask)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if done == n_split - 1:
            total = tl.zeros_like(acc)
            for s0 in range(0, n_split, S_CHUNK):  # S_CHUNK loads in flight at a time, added in order
                for j in tl.static_range(S_CHUNK):
                    # the split bound as a tensor like mask (Triton 3.9's interpreter turns a scalar
                    # bool and-ed into a mask into an int32 mask, which its loads refuse)
                    ok = mask & ((offs * 0 + s0 + j) < n_split)
                    total += tl.load(part_ptr + (s0 + j) * MN + offs, mask=ok, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + offs, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")


def chunk(elems_per_thread: int, budget: int = 64) -> int:
    """S_CHUNK: partial tiles loaded at once, so that chunk x a thread's tile elements stays near budget."""
    s = 1
    while s * 2 <= min(16, budget // max(1, elems_per_thread)):
        s *= 2
    return s


def workspace(split: int, m: int, n: int, device: torch.device) -> torch.Tensor:
    """The fp32 partials [split, M, N] (never read where split == 1: a 1-element placeholder)."""
    if split == 1:
        return torch.empty(1, dtype=torch.float32, device=device)
    return torch.empty((split, m, n), dtype=torch.float32, device=device)
