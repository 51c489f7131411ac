"""The mma.sync kernel (ops/matmul/qmma.py) beside the GPTQ GEMV and the Triton tl.dot kernel, per layer.

Llama-3-8B's fused layer shapes in three GPTQ forms (4-bit group 128 as GPTQ files hold; 4-bit group 32 with
float zeros as a Q4_K / Q4_0 GGUF becomes; 8-bit group 16 as Q6_K becomes), 1-16 rows (`--ms` to 64: the DQ
build). Each kernel runs over
enough copies of the layer that the copies pass the GPU's L2 twice (a decode step reads every layer once,
cold), as one CUDA graph; the time is a call's share (`experiments/gemv_cold_gpu.py`'s timer and copy bandwidth;
the runs in benchmarks/results/h100-llama3-8b-qmma/ timed the same graph with this script's own copy of them).
% of copy bandwidth counts the codes, scales and zeros.
Also, at 1-16 rows, the split-K sum's other form and the persistent grid (`qmma_splitmaj_us`, `qmma_persist_us`),
the sm_75 build (two m16n8k8 mmas, JIT-compiled from PTX for this GPU) and a sweep of launch shapes.

    python benchmarks/qmma_gpu.py --table --out OUT/qmma.json
    python benchmarks/qmma_gpu.py --sweep --sweep-ms 1,16 --sweep-shapes o,gate_up --out OUT/sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments"))
import gemv_cold_gpu as cold  # noqa: E402  the cold-copies graph timer and the copy bandwidth
from lowgear.ops.matmul import gptq_gemv as G, gptq_mma as MM, qmma as Q  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
FORMS = {"gptq4_g128": (4, 128), "q4k_g32": (4, 32), "q6k_g16": (8, 16)}


def layers(n, k, bits, gs, copies):
    out = []
    for c in range(copies):
        g = torch.Generator(device="cuda").manual_seed(c)
        qw = torch.randint(-(1 << 31), 1 << 31, (k * bits // 32, n), generator=g, device="cuda",
                           dtype=torch.int64).to(torch.int32)
        z = (torch.rand((k // gs, n), generator=g, device="cuda") * (1 << bits)).half()
        s = (torch.rand((k // gs, n), generator=g, device="cuda") * 0.01 + 0.001).half()
        out.append((qw, z, s))
    return out


def timed(fn, ls) -> float:
    """Microseconds a call: fn(layer) over every copy, replayed as one CUDA graph (gemv_cold_gpu's timer)."""
    return cold.timed([lambda L=L: fn(L) for L in ls], rep_ms=100)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,2,4,8,12,16")
    ap.add_argument("--out", default=None)
    ap.add_argument("--table", action="store_true", help="qmma beside the GEMV and tl.dot kernels, every form")
    ap.add_argument("--sweep", action="store_true", help="qmma's launch shapes, 4-bit group 128")
    ap.add_argument("--sweep-ms", default="1,16")
    ap.add_argument("--sweep-shapes", default="o,gate_up")
    ap.add_argument("--grid", default="warps=2,4;async=0,1;bps=1,2,4",
                    help="launch choices to cross: warps, stages, minb, bps, async, ring")
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--no-sm75", action="store_true", help="--table without the sm_75 build")
    ap.add_argument("--forms", default=",".join(FORMS), help="weight forms for --table, in order")
    a = ap.parse_args()
    t0 = time.time()
    cap = torch.cuda.get_device_capability()
    bw = cold.copy_bandwidth()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    print(f"{torch.cuda.get_device_name()} sm_{cap[0]}{cap[1]}, copy {bw / 1e9:.0f} GB/s, L2 {l2 >> 20} MB", flush=True)
    rows = []
    for (form, (bits, gs)), (shape, (n, k)) in itertools.product(
            [(f, FORMS[f]) for f in a.forms.split(",")] if a.table else [], SHAPES.items()):
        if time.time() - t0 > a.budget_s:
            print("budget spent", flush=True)
            break
        nbytes = n * k * bits // 8 + 2 * 2 * n * (k // gs)
        copies = max(2, -(-2 * l2 // nbytes))
        ls = layers(n, k, bits, gs, copies)
        block_r = G.gemv_tile_rows(bits, gs, k)
        block_k = MM.mma_block_k(bits, gs, k)
        for m in [int(v) for v in a.ms.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            row = {"form": form, "shape": shape, "N": n, "K": k, "M": m, "bytes": nbytes}
            row["qmma_us"] = timed(lambda L: Q.qmma(x, L[0], L[1], L[2], bits, gs, cap), ls)
            if m <= Q.FOLD_MAX_M:  # the split-K sum's other form (SPLIT_MAJOR_SUM)
                other = "qmma_rowsum_us" if Q.SPLIT_MAJOR_SUM else "qmma_splitmaj_us"
                row[other] = timed(lambda L: Q.qmma(x, L[0], L[1], L[2], bits, gs, cap,
                                                    split_major=not Q.SPLIT_MAJOR_SUM), ls)
            if m <= Q.FOLD_MAX_M and cap >= Q.ASYNC_FROM:  # the persistent grid (qmma.PERSISTENT)
                row["qmma_persist_us"] = timed(lambda L: Q.qmma(x, L[0], L[1], L[2], bits, gs, cap,
                                                                persistent=True), ls)
            if not a.no_sm75:
                row["qmma_sm75_us"] = timed(lambda L: Q.qmma(x, L[0], L[1], L[2], bits, gs, (7, 5)), ls)
            if m <= G.MAX_M and block_r is not None:
                row["gemv_us"] = timed(lambda L: G.gptq_gemv(x, L[0], L[1], L[2], None, bits, gs, block_r,
                                                             float_z=True), ls)
            if m >= 4 and block_k is not None:
                row["tldot_us"] = timed(lambda L: MM.gptq_mma(x, L[0], L[1], L[2], None, bits, gs, block_k), ls)
            for key in [c for c in row if c.endswith("_us")]:
                row[key.replace("_us", "_pct")] = round(100 * nbytes / (row[key] * 1e-6) / bw, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    sweep = []
    if a.sweep:
        grid = {kv.split("=")[0]: [int(v) for v in kv.split("=")[1].split(",")] for kv in a.grid.split(";")}
        for shape in a.sweep_shapes.split(","):
            n, k = SHAPES[shape]
            bits, gs = 4, 128
            nbytes = n * k * bits // 8 + 2 * 2 * n * (k // gs)
            ls = layers(n, k, bits, gs, max(2, -(-2 * l2 // nbytes)))
            names = {"warps": "warps", "stages": "stages", "minb": "min_blocks", "bps": "blocks_per_sm",
                     "async": "use_async", "ring": "ring"}
            keys = list(grid)
            for m, combo in itertools.product([int(v) for v in a.sweep_ms.split(",")],
                                              list(itertools.product(*(grid[key] for key in keys)))):
                if time.time() - t0 > a.budget_s:
                    break
                kw = {names[key]: v for key, v in zip(keys, combo)}
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                us = timed(lambda L: Q.qmma(x, L[0], L[1], L[2], bits, gs, cap, **kw), ls)
                r = {"shape": shape, "M": m, **dict(zip(keys, combo)), "us": us,
                     "pct": round(100 * nbytes / (us * 1e-6) / bw, 1)}
                sweep.append(r)
                print(json.dumps(r), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_GBps": bw / 1e9, "rows": rows, "sweep": sweep},
                      f, indent=1)


if __name__ == "__main__":
    main()
