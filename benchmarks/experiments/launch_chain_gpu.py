"""What a kernel boundary costs inside a graphed decode step, against a grid-wide barrier in one kernel.

    python benchmarks/experiments/launch_chain_gpu.py [--links 320] [--programs 132,264,528,1056] [--floats 64]

A batch-1 decode step of an 8B model is ~320 short kernels in a chain, each reading what the one
before wrote. This times such a chain with the work taken out: every link reads a small vector
the previous link wrote (`--floats` per program) and writes it back plus one, over `--programs` programs.

- `graph`: one kernel per link, captured in a CUDA graph, plain launches;
- `graph+pdl`: the same with programmatic dependent launch (pdl.py), each link released right after
  its wait (WAIT, what one-row decode launches use);
- `persistent`: one kernel whose programs run every link in turn with a grid-wide barrier between
  links (a counter bumped by each program, spun on until all have arrived): what a persistent
  decode kernel would pay per dependent phase instead of a launch. Its programs must all be
  resident at once (no more than the GPU holds), or it would never finish: the script checks the
  count against the SMs.

Per link: the chain's time over its length. A benchmark, not a kernel lowgear runs (a spin barrier
cannot run under the interpreter, whose programs run one after another).
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def link_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=ok, other=0.0) + 1.0, mask=ok)


@triton.jit
def persistent_kernel(buf_ptr, cnt_ptr, n, links, BLOCK: tl.constexpr):
    """Link i reads half i % 2 of buf [2n] and writes the other half plus one, then waits for every program."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    programs = tl.num_programs(0)
    for i in range(links):
        src = buf_ptr + (i % 2) * n
        dst = buf_ptr + (1 - i % 2) * n
        v = tl.load(src + offs, mask=ok, other=0.0, cache_modifier=".cg")
        tl.store(dst + offs, v + 1.0, mask=ok)
        tl.debug_barrier()  # every thread's store before the arrival
        tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")
        target = programs * (i + 1)
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
        while seen < target:
            seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()


def time_graph(fn, reps: int = 20) -> float:
    """Seconds per replay of a CUDA graph of `fn` (median of `reps`)."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn()  # compile outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--links", type=int, default=320)
    ap.add_argument("--programs", default="132,264,528,1056")
    ap.add_argument("--floats", type=int, default=64, help="fp32 values each program reads and writes a link")
    a = ap.parse_args()
    dev = torch.device("cuda:0")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"{torch.cuda.get_device_name(dev)} ({sms} SMs), {a.links} links, {a.floats} floats a program", flush=True)
    cnt = torch.zeros(1, dtype=torch.int32, device=dev)
    block = triton.next_power_of_2(a.floats)
    for programs in (int(p) for p in a.programs.split(",")):
        n = programs * block
        buf = torch.zeros(2 * n, device=dev)
        x, y = buf[:n], buf[n:]
        grid = (programs,)

        def chain(pdl: bool):
            def run():
                for i in range(a.links):
                    src, dst = (x, y) if i % 2 == 0 else (y, x)
                    link_kernel[grid](src, dst, n, BLOCK=block, PDL=int(pdl), num_warps=4,
                                      **({"launch_pdl": True} if pdl else {}))
            return run

        def persistent():
            cnt.zero_()
            persistent_kernel[grid](buf, cnt, n, a.links, BLOCK=block, num_warps=4)

        row = [f"{programs:5d} programs:"]
        for name, fn in (("graph", chain(False)), ("graph+pdl", chain(True))):
            row.append(f"{name} {time_graph(fn) / a.links * 1e6:6.2f} us")
        if grid[0] <= sms * 8:  # 4-warp programs: 8 an SM fit, so every program is resident at once
            row.append(f"persistent {time_graph(persistent) / a.links * 1e6:6.2f} us")
            buf.zero_()
            persistent()  # once more from zeros: every element must have gained one per link
            got = (x if a.links % 2 == 0 else y).min().item(), (x if a.links % 2 == 0 else y).max().item()
            row.append(f"(check: {got[0]:.0f}..{got[1]:.0f} of {a.links})")
        print("  per link: " + "  ".join(row), flush=True)


if __name__ == "__main__":
    main()
