"""The GPTQ decode GEMV with its weights coming from HBM, as in a decode step: a launch sweep.

    python benchmarks/experiments/gemv_cold_gpu.py --out OUT.json [--quick]
    TRITON_INTERPRET=1 python benchmarks/experiments/gemv_cold_gpu.py --cpu-smoke   # the script's logic, tiny shapes

`gptq_gemv_gpu.py` times one layer over and over, so an 8B layer (8-30 MB) sits in the H100's 50 MB
L2 and the figures flatter the kernel. Here each case owns enough copies of its layer (>= 256 MB)
that a CUDA graph of one GEMV per copy reads every byte from HBM once per replay; time per GEMV =
replay time / copies. Shapes are the fused Llama-3-8B linears at 4-bit g128 (q|k|v 6144x4096,
o 4096x4096, gate|up 28672x4096, down 4096x14336), M = 1. Swept: num_warps x split-K x tile rows
(BLOCK_R); reported as GB/s and % of a device-to-device copy measured in the same run,
beside cuBLAS on the float16 weights (also cold). Every configuration's output is checked against
the layer's torch dequantize + matmul first. (The runs recorded in benchmarks/results/h100-llama3-8b-dot-decode-splitk-gemv/
also swept a next-tile register prefetch, since taken out of the kernel: `prefetch` in their JSON.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import triton
import triton.testing

from lowgear.model.linear import QuantLinear
from lowgear.ops import matmul as kernels
from lowgear.formats.gptq import GPTQWeight
from lowgear.ops.matmul import gptq_gemv as G

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
DEVICE = "cuda"


def layer(n: int, k: int, seed: int) -> QuantLinear:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    rnd = lambda *shape: torch.randint(-(1 << 31), 1 << 31, shape, generator=g, device=DEVICE,  # noqa: E731
                                       dtype=torch.int64).to(torch.int32)
    scales = (torch.rand((k // 128, n), generator=g, device=DEVICE) * 0.01 + 0.001).half()
    lin = QuantLinear(GPTQWeight(rnd(k // 8, n), rnd(k // 128, n // 8), scales, None, 4, 128, False, 1))
    lin.kernel = kernels.kernel_for(lin)
    return lin


def timed(fns, rep_ms: int) -> float:
    """Microseconds per call of a list of calls replayed as one CUDA graph (plain timing on the CPU)."""
    def all_calls():
        for f in fns:
            f()
    if DEVICE == "cpu":
        t = time.perf_counter()
        all_calls()
        return (time.perf_counter() - t) * 1e6 / len(fns)
    return triton.testing.do_bench_cudagraph(all_calls, rep=rep_ms, return_mode="median") * 1e3 / len(fns)


def copy_bandwidth() -> float:
    if DEVICE == "cpu":
        return 1e10
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    ms = triton.testing.do_bench(lambda: a.clone(), warmup=5, rep=50, return_mode="median")
    return 2 * (1 << 30) / (ms * 1e-3)


def run_shape(name: str, n: int, k: int, budget: int, copy_bw: float, quick: bool, rep_ms: int,
              sweep: dict | None = None) -> dict:
    first = layer(n, k, 0)
    nbytes = sum(t.numel() * t.element_size() for t in (first.qweight, first.scales, first.gptq_zeros))
    copies = max(2, -(-budget // nbytes))
    lins = [first] + [layer(n, k, i) for i in range(1, copies)]
    x = torch.randn(1, k, device=DEVICE, dtype=torch.float16)
    ref = x.float() @ first.dequantized(torch.float32).t()
    block_r = first._gptq_kernel["block_r"]

    def call(lin, **kw):
        return G.gptq_gemv(x, lin.qweight, lin.gptq_zeros, lin.scales, None, 4, 128, block_r, **kw)

    warps = (1, 2, 4) if not quick else (2, 4)
    splits = (None, 4, 8, 16, 32) if not quick else (None, 8, 16)
    tiles = (16, 8, 4) if not quick else (16, 8)
    if sweep:
        warps, splits, tiles = (sweep.get(key, dflt) for key, dflt in
                                (("warps", warps), ("splits", splits), ("tiles", tiles)))
    rows = []
    for nw, sp, tr in itertools.product(warps, splits, tiles):
        kw = dict(num_warps=nw, split=sp, tile_r=tr)
        p = G.launch_params(n, k, 4, block_r, 1, nw, sp, tr, G.uses_half2(x, 4, None))
        err = float((call(first, **kw).float() - ref).abs().max() / ref.abs().max())
        if err > 2e-3:
            rows.append({**kw, "split": p["split"], "error": f"rel err {err:.2e}"})
            continue
        us = timed([lambda lin=lin: call(lin, **kw) for lin in lins], rep_ms)
        rows.append({**kw, "split": p["split"], "BLOCK_R": p["BLOCK_R"], "us": us, "GBps": nbytes / us / 1e3,
                     "pct_copy": 100 * nbytes / (us * 1e-6) / copy_bw})
    ok = [r for r in rows if "us" in r]
    best = min(ok, key=lambda r: r["us"])
    default = G.launch_params(n, k, 4, block_r, 1, half2=G.uses_half2(x, 4, None))
    t_default = timed([lambda lin=lin: call(lin) for lin in lins], rep_ms)
    w16 = [lin.dequantized(torch.float16) for lin in lins[: max(2, -(-budget // (n * k * 2)))]]
    t_fp16 = timed([lambda w=w: x @ w.t() for w in w16], rep_ms)
    del w16
    out = {"name": name, "N": n, "K": k, "bytes": nbytes, "copies": copies,
           "default": {**default, "us": t_default, "GBps": nbytes / t_default / 1e3,
                       "pct_copy": 100 * nbytes / (t_default * 1e-6) / copy_bw},
           "best": best, "cublas_fp16_us": t_fp16, "cublas_fp16_GBps": n * k * 2 / t_fp16 / 1e3, "sweep": rows}
    print(f"{name:8s} {n:6d}x{k:<6d} {nbytes / 1e6:6.1f} MB | default {t_default:7.1f} us "
          f"{out['default']['GBps']:6.0f} GB/s {out['default']['pct_copy']:4.0f}% | best {best['us']:7.1f} us "
          f"{best['GBps']:6.0f} GB/s {best['pct_copy']:4.0f}%  warps {best['num_warps']} split {best['split']} "
          f"BLOCK_R {best['BLOCK_R']} | cuBLAS fp16 {t_fp16:7.1f} us "
          f"{out['cublas_fp16_GBps']:6.0f} GB/s", flush=True)
    return out


def main() -> None:
    global DEVICE, SHAPES
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-mb", type=int, default=256, help="bytes of copies per case (> 2x the L2)")
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--warps", default=None, help="comma list (default 1,2,4)")
    ap.add_argument("--splits", default=None, help="comma list; 0 for the default split")
    ap.add_argument("--tiles", default=None, help="comma list of BLOCK_R caps (default 16,8,4)")
    a = ap.parse_args()
    ints = lambda v: tuple(int(x) for x in v.split(","))  # noqa: E731
    sweep = {}
    if a.warps:
        sweep["warps"] = ints(a.warps)
    if a.splits:
        sweep["splits"] = tuple(x or None for x in ints(a.splits))
    if a.tiles:
        sweep["tiles"] = ints(a.tiles)
    rep_ms = 25
    if a.cpu_smoke:
        DEVICE, SHAPES, a.budget_mb, rep_ms = "cpu", {"tiny": (256, 256)}, 1, 1
    copy_bw = copy_bandwidth()
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"{name}: copy {copy_bw / 1e9:.0f} GB/s; GPTQ 4-bit g128 GEMV, M = 1, weights from HBM", flush=True)
    t0 = time.perf_counter()
    results = [run_shape(s, n, k, a.budget_mb << 20, copy_bw, a.quick or a.cpu_smoke, rep_ms, sweep)
               for s, (n, k) in SHAPES.items()]
    print(f"{time.perf_counter() - t0:.0f} s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": name, "copy_GBps": copy_bw / 1e9, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
