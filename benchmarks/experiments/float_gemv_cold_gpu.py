"""The float16 decode GEMV (quant/kernels/float_gemv.py) with its weights coming from HBM: a launch sweep.

    python benchmarks/experiments/float_gemv_cold_gpu.py --out OUT.json [--quick]
    TRITON_INTERPRET=1 python benchmarks/experiments/float_gemv_cold_gpu.py --cpu-smoke   # the script's logic, tiny shapes

As in gemv_cold_gpu.py (the GPTQ GEMV's sweep), each case owns enough copies of its layer
(>= --budget-mb, and at least 2) that a CUDA graph of one GEMV per copy reads every weight from
HBM once per replay; time per GEMV = replay time / copies. Shapes are the fused Llama-3-8B linears
in float16 (q|k|v 6144x4096, o 4096x4096, gate|up 28672x4096, down 4096x14336) and its head
(128256x4096), M = 1. Swept: num_warps x BLOCK_K x BLOCK_N x split-K; reported as GB/s and % of a
device-to-device copy measured in the same run, beside cuBLAS (torch.matmul, also cold). Every
configuration's output is checked against x.float() @ w.float().T first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

import gemv_cold_gpu as cold  # benchmarks/, beside this file: graph timing and the copy bandwidth
from lowgear.ops.matmul import float_gemv as F

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def run_shape(name: str, n: int, k: int, budget: int, copy_bw: float, quick: bool, rep_ms: int) -> dict:
    dev = cold.DEVICE
    nbytes = n * k * 2
    copies = max(2, -(-budget // nbytes))
    g = torch.Generator(device=dev).manual_seed(0)
    ws = [(torch.randn(n, k, generator=g, device=dev) * 0.02).half() for _ in range(copies)]
    x = torch.randn(1, k, generator=g, device=dev).half()
    ref = x.float() @ ws[0].float().t()
    warps = (4, 8) if not quick else (4,)
    block_ks = (256, 512) if not quick else (256,)
    block_ns = (None, 4, 8, 16, 32) if not quick else (None, 8)
    splits = (None, 1, 2, 4, 8) if not quick else (None, 2)
    rows, seen = [], set()
    for nw, bk, bn, sp in itertools.product(warps, block_ks, block_ns, splits):
        p = F.launch_params(n, k, 1, sp, bn, nw, bk)
        key = (p["num_warps"], p["BLOCK_K"], p["BLOCK_N"], p["split"])
        if key in seen:
            continue
        seen.add(key)
        kw = dict(num_warps=nw, block_k=bk, block_n=p["BLOCK_N"], split=p["split"])
        err = float((F.float_gemv(x, ws[0], **kw).float() - ref).abs().max() / ref.abs().max())
        if err > 3e-3:
            rows.append({**kw, "error": f"rel err {err:.2e}"})
            continue
        us = cold.timed([lambda w=w: F.float_gemv(x, w, **kw) for w in ws], rep_ms)
        rows.append({**kw, "us": us, "GBps": nbytes / us / 1e3, "pct_copy": 100 * nbytes / (us * 1e-6) / copy_bw})
    ok = [r for r in rows if "us" in r]
    best = min(ok, key=lambda r: r["us"])
    default = F.launch_params(n, k, 1)
    t_default = cold.timed([lambda w=w: F.float_gemv(x, w) for w in ws], rep_ms)
    t_cublas = cold.timed([lambda w=w: x @ w.t() for w in ws], rep_ms)
    out = {"name": name, "N": n, "K": k, "bytes": nbytes, "copies": copies,
           "default": {**default, "us": t_default, "GBps": nbytes / t_default / 1e3,
                       "pct_copy": 100 * nbytes / (t_default * 1e-6) / copy_bw},
           "best": best, "cublas_us": t_cublas, "cublas_GBps": nbytes / t_cublas / 1e3, "sweep": rows}
    print(f"{name:8s} {n:6d}x{k:<6d} {nbytes / 1e6:6.1f} MB | default {t_default:7.1f} us "
          f"{out['default']['pct_copy']:4.0f}% | best {best['us']:7.1f} us {best['pct_copy']:4.0f}%  "
          f"warps {best['num_warps']} BLOCK_K {best['block_k']} BLOCK_N {best['block_n']} split {best['split']} | "
          f"cuBLAS {t_cublas:7.1f} us {100 * nbytes / (t_cublas * 1e-6) / copy_bw:4.0f}%", flush=True)
    del ws
    return out


def main() -> None:
    global SHAPES
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-mb", type=int, default=256, help="bytes of copies per case (> 2x the L2)")
    ap.add_argument("--cpu-smoke", action="store_true")
    a = ap.parse_args()
    rep_ms = 25
    if a.cpu_smoke:
        cold.DEVICE, SHAPES, a.budget_mb, rep_ms = "cpu", {"tiny": (64, 512)}, 1, 1
    copy_bw = cold.copy_bandwidth()
    name = torch.cuda.get_device_name() if cold.DEVICE == "cuda" else "cpu"
    print(f"{name}: copy {copy_bw / 1e9:.0f} GB/s; float16 GEMV, M = 1, weights from HBM", flush=True)
    t0 = time.perf_counter()
    results = [run_shape(s, n, k, a.budget_mb << 20, copy_bw, a.quick or a.cpu_smoke, rep_ms)
               for s, (n, k) in SHAPES.items()]
    print(f"{time.perf_counter() - t0:.0f} s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": name, "copy_GBps": copy_bw / 1e9, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
