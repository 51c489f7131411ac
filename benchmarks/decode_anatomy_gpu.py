"""Where a batch-1 decode step's time goes, kernel by kernel, and what bounds its GEMVs.

    python benchmarks/decode_anatomy_gpu.py [--quant gptq4] [--context 512] [--layer 8] [--no-micro] [--out DIR]

1. Timeline. One graphed batch-1 step of a random-weight model (triton rung, paged cache), profiled
   over a few replays with PDL off and on. Per position in a layer (mean over the layers): the kernel,
   its own duration, and its share of the critical path (its end minus the previous kernel's end,
   which with PDL is what the kernel adds to the step), plus the weight bytes a GEMV reads and the
   rate that share implies. The step's kernels outside the layers (embedding, final norm, lm_head,
   sampling) are listed as they come.
2. GEMV bound (`--no-micro` skips it). Each GPTQ shape of the layer alone, CUDA-graph timed with
   the weights cycled through more copies than L2 holds: the package GEMV; the same grid and tiles
   with the unpack replaced by an XOR of the words (what the launch costs with no arithmetic); and
   that load-only kernel with one tile a program (all of a program's loads issued at once). The gap
   between the first two is the time the unpack adds; between the last and the copy bandwidth, the
   time the launch's shape costs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict

import torch
import triton
import triton.language as tl
from profile_decode_gpu import graph_time  # benchmarks/, beside this file
from torch.profiler import ProfilerActivity, profile

from lowgear.bench.command import PRESETS, Timer, measure_bandwidth
from lowgear.bench.models import synthetic_model
from lowgear.engine.graphs import DecodeGraphs, DecodeRow
from lowgear.ops.matmul import gptq_gemv as gptq

PAGE = 256
GEMV_NAMES = ("q|k|v", "o", "gate|up", "down")  # a layer's linears in the order they run


def set_pdl(on: bool) -> None:
    """PDL on (as configured) or off (LOWGEAR_NO_PDL=1) for the launches that follow."""
    if on:
        os.environ.pop("LOWGEAR_NO_PDL", None)
    else:
        os.environ["LOWGEAR_NO_PDL"] = "1"


def step_events(fn, replays: int = 4) -> list[tuple[str, float, float]]:
    """(name, start µs, end µs) of the CUDA kernels of one call of fn (the second-to-last of `replays`)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            fn()
        torch.cuda.synchronize()
    ev = sorted(((e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower()
                 and "memset" not in e.name.lower()), key=lambda t: t[1])
    per = len(ev) // replays
    return ev[per * (replays - 2): per * (replays - 1)]


def short(name: str) -> str:
    return name.split("(")[0].split("<")[0][:40]


def timeline(model, graphs, rows, layer_bytes: dict[int, int], bandwidth: float, shown_layer: int) -> dict:
    """Print the step's kernels (see the module docstring); returns them per position in a layer."""
    ev = step_events(lambda: graphs.run(rows))
    wall = ev[-1][2] - ev[0][1]
    norms = [i for i, (n, _, _) in enumerate(ev) if "rms" in n.lower()]
    layers = len(model.layers)
    starts = norms[0:2 * layers:2]
    print(f"    one step: {len(ev)} kernels, {wall:.1f} µs first start to last end; "
          f"kernel time summed {sum(e - s for _, s, e in ev):.1f} µs")
    per_pos: dict[int, list] = defaultdict(list)
    for li, s0 in enumerate(starts):
        s1 = starts[li + 1] if li + 1 < len(starts) else norms[2 * layers] if len(norms) > 2 * layers else len(ev)
        for j in range(s0, s1):
            prev_end = ev[j - 1][2] if j else ev[j][1]
            per_pos[j - s0].append((ev[j][0], ev[j][2] - ev[j][1], ev[j][2] - prev_end))
    tot_own = tot_crit = 0.0
    print(f"    per position in a layer (mean of {layers}): own µs, critical-path µs (end - previous end)")
    gemv_i = 0
    record = {"kernels": len(ev), "span_us": wall, "positions": [], "outside": []}
    for pos in sorted(per_pos):
        xs = per_pos[pos]
        if len(xs) < layers:  # kernels between the last layer and the final norm: listed as outside
            continue
        name = short(xs[0][0])
        own = sum(x[1] for x in xs) / len(xs)
        crit = sum(x[2] for x in xs) / len(xs)
        tot_own += own
        tot_crit += crit
        extra = ""
        nb = None
        if "gemv" in xs[0][0] or "mma" in xs[0][0]:
            nb = layer_bytes.get(gemv_i)
            gemv_i += 1
            if nb:
                extra = (f"  {nb / 1e6:6.1f} MB: {nb / crit / 1e6:5.2f} TB/s on the path "
                         f"(roofline {nb / bandwidth * 1e6:5.1f} µs)")
        print(f"      {pos:2d} {name:40s} {own:7.2f} {crit:7.2f}{extra}")
        if nb is not None:
            name += f" {GEMV_NAMES[gemv_i - 1]}"
        record["positions"].append({"name": name, "own_us": own, "critical_us": crit, "weight_bytes": nb})
    print(f"      layer total: own {tot_own:.1f} µs, critical path {tot_crit:.1f} µs; x{layers} = {tot_crit * layers / 1e3:.3f} ms")
    first = starts[0]
    last = starts[-1] + len(record["positions"])
    outside = list(range(first)) + list(range(last, len(ev)))
    for j in outside:
        prev_end = ev[j - 1][2] if j else ev[j][1]
        print(f"      outside: {short(ev[j][0]):40s} {ev[j][2] - ev[j][1]:7.2f} {ev[j][2] - prev_end:7.2f}")
        record["outside"].append({"name": short(ev[j][0]), "own_us": ev[j][2] - ev[j][1], "critical_us": ev[j][2] - prev_end})
    if 0 <= shown_layer < len(starts) - 1:
        print(f"    layer {shown_layer} as it ran (start µs from the layer's first kernel, own µs):")
        t0 = ev[starts[shown_layer]][1]
        for j in range(starts[shown_layer], starts[shown_layer + 1]):
            print(f"      {ev[j][1] - t0:8.2f} {ev[j][2] - ev[j][1]:7.2f}  {short(ev[j][0])}")
    return record


def plot(runs: list[dict], bandwidth: float, path: str) -> bool:
    """One bar per run: a layer's critical path, kernel by kernel, beside its weight roofline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.9 * len(runs)))
    colors = {"gemv": "#4c72b0", "mma": "#4c72b0", "rms": "#dd8452", "rope": "#55a868", "paged": "#c44e52",
              "silu": "#8172b3"}
    for i, run in enumerate(runs):
        x = 0.0
        for p in run["timeline"]["positions"]:
            color = next((c for key, c in colors.items() if key in p["name"]), "#999999")
            ax.barh(i, p["critical_us"], left=x, color=color, edgecolor="white")
            if p["critical_us"] > 3:
                ax.text(x + p["critical_us"] / 2, i, p["name"].split()[-1].replace("_kernel", "").replace("paged_decode", "attn"),
                        ha="center", va="center", fontsize=7, color="white")
            x += p["critical_us"]
        roof = sum(p["weight_bytes"] or 0 for p in run["timeline"]["positions"]) / bandwidth * 1e6
        ax.plot([roof, roof], [i - 0.45, i + 0.45], color="black", lw=2)
    ax.set_yticks(range(len(runs)), [r["label"] for r in runs])
    ax.set_xlabel("µs on a layer's critical path (black bar: the layer's weight bytes at copy bandwidth)")
    ax.set_title("Batch-1 decode, one Llama-3-8B-shape layer, kernel by kernel")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


@triton.jit
def load_only_kernel(qw_ptr, out_ptr, N, ROWS, rows_per_split, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """The GEMV's tile walk with an XOR for arithmetic: what its loads alone cost."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    r_lo = pid_k * rows_per_split
    r_hi = tl.minimum(r_lo + rows_per_split, ROWS)
    acc = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < r_hi)[:, None] & cmask[None, :]
        w = tl.load(qw_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=m, other=0)
        acc ^= tl.xor_sum(w, axis=0)
    tl.store(out_ptr + pid_k * N + cols, acc, mask=cmask & (acc == 0x12345678))  # almost never writes


def per_copy_us(fn, copies: int) -> float:
    """µs per weight copy of fn (a launch on each of `copies` copies), from a CUDA graph of three calls."""
    return graph_time(fn, reps=3) * 1e6 / copies


def gemv_bound(spec, bandwidth: float) -> None:
    dev = torch.device("cuda:0")
    h, q, kv, inter = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
    shapes = {"q|k|v": (q + 2 * kv, h), "o": (h, q), "gate|up": (2 * inter, h), "down": (h, inter)}
    print("  GEMV alone, batch 1, 4-bit g128, weights cycled past L2 (µs; TB/s of qweight + scales + zeros):")
    for pdl_on in (False, True):
        set_pdl(pdl_on)
        print(f"   PDL {'on' if pdl_on else 'off'} (back-to-back launches in one graph)")
        for name, (n, k) in shapes.items():
            groups = k // 128
            nbytes = k * n // 2 + 2 * groups * n * 2
            copies = max(2, math.ceil(200e6 / nbytes))
            ws = [(torch.randint(-(1 << 31), 1 << 31, (k // 8, n), dtype=torch.int64, device=dev).to(torch.int32),
                   torch.full((groups, n), 8.0, dtype=torch.float16, device=dev),
                   torch.full((groups, n), 0.001, dtype=torch.float16, device=dev)) for _ in range(copies)]
            x = torch.randn(1, k, device=dev, dtype=torch.float16)
            br = gptq.gemv_tile_rows(4, 128, k)
            t_gemv = per_copy_us(lambda: [gptq.gptq_gemv(x, qw, z, s, None, 4, 128, br) for qw, z, s in ws], copies)
            p = gptq.launch_params(n, k, 4, br, 1, half2=True)
            tiles = k // 8 // p["BLOCK_R"]
            t_gemv1 = per_copy_us(lambda: [gptq.gptq_gemv(x, qw, z, s, None, 4, 128, br, split=tiles)
                                          for qw, z, s in ws], copies)
            out = torch.empty((p["split"] + k // 8, n), dtype=torch.int32, device=dev)
            grid = (triton.cdiv(n, p["BLOCK_N"]), p["split"])
            t_load = per_copy_us(lambda: [load_only_kernel[grid](qw, out, n, k // 8, p["rows_per_split"], BLOCK_R=p["BLOCK_R"],
                                                                 BLOCK_N=p["BLOCK_N"], num_warps=p["num_warps"])
                                          for qw, _, _ in ws], copies)
            grid1 = (grid[0], triton.cdiv(k // 8, p["BLOCK_R"]))
            t_one = per_copy_us(lambda: [load_only_kernel[grid1](qw, out, n, k // 8, p["BLOCK_R"], BLOCK_R=p["BLOCK_R"],
                                                                BLOCK_N=p["BLOCK_N"], num_warps=p["num_warps"])
                                         for qw, _, _ in ws], copies)
            qbytes = k * n // 2
            print(f"    {name:8s} {n:6d}x{k:5d} {nbytes / 1e6:5.1f} MB (roofline {nbytes / bandwidth * 1e6:5.1f} µs): "
                  f"GEMV {t_gemv:6.2f} µs {nbytes / t_gemv / 1e6:4.2f}, "
                  f"one tile a program {t_gemv1:6.2f} | load-only {t_load:6.2f} "
                  f"{qbytes / t_load / 1e6:4.2f} ({grid[0]}x{grid[1]} programs, {p['rows_per_split'] // p['BLOCK_R']} tiles of "
                  f"{p['BLOCK_R']}x{p['BLOCK_N']}) | one tile a program {t_one:6.2f} {qbytes / t_one / 1e6:4.2f} "
                  f"({grid1[0] * grid1[1]} programs)", flush=True)
            del ws
    set_pdl(True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--quant", default="gptq4")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--no-micro", action="store_true")
    ap.add_argument("--out", default=None, help="folder for anatomy.json and anatomy.png")
    a = ap.parse_args()
    runs = []
    dev = torch.device("cuda:0")
    spec = PRESETS[a.preset]
    bandwidth = measure_bandwidth(Timer(dev), quick=False)
    print(f"{torch.cuda.get_device_name(dev)}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, {spec.name}, "
          f"context {a.context}, batch 1", flush=True)
    if not a.no_micro:
        gemv_bound(spec, bandwidth)
    for quant in a.quant.split(","):
        model, cache = synthetic_model(spec, quant, dev, 4 * PAGE + (a.context // PAGE + 2) * PAGE, PAGE)
        layer = model.layers[0]
        linears = [layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down]
        layer_bytes = {}
        for i, lin in enumerate(linears):
            if lin is not None and lin._gptq is not None:
                layer_bytes[i] = lin.qweight.numel() * 4 + lin.scales.numel() * 2 * 2  # codes, scales, float zeros
            elif lin is not None:
                layer_bytes[i] = lin.nbytes
        per_seq = -(-(a.context + 1) // PAGE)
        pages = cache.pool.allocate(per_seq)
        rows = [DecodeRow(5, a.context + 1, pages)]
        for pdl_on in (False, True):
            set_pdl(pdl_on)
            graphs = DecodeGraphs(model, cache, 1, cache.capacity_tokens)
            graphs.run(rows)
            t = Timer(dev).median(lambda: graphs.run(rows), 3, 20)
            print(f"  {quant}, PDL {'on' if pdl_on else 'off'}: graph replay {t * 1e3:.3f} ms", flush=True)
            runs.append({"label": f"{quant}, PDL {'on' if pdl_on else 'off'}", "replay_ms": t * 1e3,
                         "timeline": timeline(model, graphs, rows, layer_bytes, bandwidth, a.layer)})
            graphs.release()
        cache.pool.release(pages)
        del model, cache
        torch.cuda.empty_cache()
    set_pdl(True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "anatomy.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "bandwidth": bandwidth, "preset": spec.name,
                       "context": a.context, "runs": runs}, f, indent=1)
        drawn = plot(runs, bandwidth, os.path.join(a.out, "anatomy.png"))
        print(f"wrote {a.out}/anatomy.json" + (" and anatomy.png" if drawn else " (no matplotlib: no plot)"))


if __name__ == "__main__":
    main()
