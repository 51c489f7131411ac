"""Experiment (issue 21): 4-bit codes held as bytes [K/2, N] for batched decode, against the GPTQ tl.dot kernel.

Compiled for sm_90, the GPTQ tl.dot kernel (ops/matmul/gptq_mma.py) unpacks each [BLOCK_K, BLOCK_N] code tile
in registers, reshapes it, and Triton writes the fp16 tile to shared memory and reads it back in the mma
operand layout (32 KB a 128 x 128 tile, with barriers), so at 8-64 rows it runs at ~20% of copy bandwidth.
Here byte i of a column holds codes 2i (low nibble) and 2i + 1 (high); a tile is two tl.dots, x's even
columns against the low nibbles and its odd columns against the high ones. Only elementwise ops lie between
the load and the dot, so Triton loads the int8 tile from shared memory straight into the operand layout
(checked in the TTGIR: no fp16 tile in shared memory) and unpacks there. Same bytes as GPTQ (a repack, not
an unpack). Beside it, the "words" column: GPTQ's own words handed to the mma as loaded, 8 K=16 dots a tile,
which became gptq_mma_kernel's WORDS form (decision 024) and is launched here from there (the results in
benchmarks/results/h100-llama3-8b-mma-operand-layouts/ came from this script's standalone copy of that loop,
before it moved into the kernel). This script times them (and the GEMV, and the kernel's first form) on the
Llama-3-8B fused layer shapes, 4-bit group 128, as CUDA-graph replays, over a small sweep of launch choices,
and checks each result against dequantize + matmul in float32.

    python benchmarks/experiments/mma_bytes_gpu.py --out $OUT/mma_bytes.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
import triton
import triton.language as tl

from lowgear.ops.matmul import splitk

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # benchmarks/, for gptq_gemv_gpu's helpers
from gptq_gemv_gpu import bench, copy_bandwidth, make_layer, gemv_bytes  # noqa: E402
from lowgear.ops.matmul import gptq_gemv as G, gptq_mma as MM  # noqa: E402

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o, gate|up, down (fused, 8B)


@triton.jit
def mma_bytes_kernel(x_ptr, qb_ptr, zf_ptr, sc_ptr, y_ptr, part_ptr, cnt_ptr,
                     M, N, K, k_per_split, group_size, stride_xm,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, S_CHUNK: tl.constexpr,
                     MAGIC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ms = tl.arange(0, BLOCK_M)
    mmask = ms < M
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    HALF: tl.constexpr = BLOCK_K // 2
    for k0 in range(k_lo, k_hi, BLOCK_K):
        r = k0 // 2 + tl.arange(0, HALF)  # byte rows
        rmask = r * 2 < k_hi
        b = tl.load(qb_ptr + r.to(tl.int64)[:, None] * N + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0)
        ke = 2 * r
        xe = tl.load(x_ptr + ms[:, None] * stride_xm + ke[None, :], mask=mmask[:, None] & rmask[None, :], other=0.0)
        xo = tl.load(x_ptr + ms[:, None] * stride_xm + ke[None, :] + 1, mask=mmask[:, None] & rmask[None, :], other=0.0)
        if MAGIC:
            lo = ((b & 15).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
            hi = ((b >> 4).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
        else:
            lo = (b & 15).to(tl.float16)
            hi = (b >> 4).to(tl.float16)
        p = tl.dot(xe, lo)
        p = tl.dot(xo, hi, p)
        xsum = tl.sum(xe.to(tl.float32), axis=1) + tl.sum(xo.to(tl.float32), axis=1)
        g = k0 // group_size
        s = tl.load(sc_ptr + g * N + cols, mask=cmask, other=0.0).to(tl.float32)
        zf = tl.load(zf_ptr + g * N + cols, mask=cmask, other=0.0).to(tl.float32)
        acc += (p - xsum[:, None] * zf[None, :]) * s[None, :]
    splitk.finish(acc, y_ptr, part_ptr, cnt_ptr, ms[:, None] * N + cols[None, :], mmask[:, None] & cmask[None, :],
                  pid_n, pid_k, tl.num_programs(1), M * N, S_CHUNK)



def to_bytes(qweight: torch.Tensor) -> torch.Tensor:
    """GPTQ 4-bit qweight int32 [K/8, N] -> uint8 [K/2, N], byte i = codes 2i (low) and 2i+1 (high)."""
    k8, n = qweight.shape
    return qweight.contiguous().view(torch.uint8).view(k8, n, 4).permute(0, 2, 1).reshape(k8 * 4, n).contiguous()


def mma_bytes(x, qb, zeros, scales, group_size, block_n=128, block_k=128, split=None, num_warps=4, num_stages=3,
              magic=True, target_programs=264, words=False):
    m, k = x.shape
    n = qb.shape[1]
    block_m = max(16, triton.next_power_of_2(m))
    tiles = triton.cdiv(k, block_k)
    n_blocks = triton.cdiv(n, block_n)
    if split is None:
        split = max(1, min(tiles, triton.cdiv(target_programs, n_blocks)))
    k_per_split = triton.cdiv(tiles, split) * block_k
    split = triton.cdiv(k, k_per_split)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (n_blocks, split)
    s_chunk = splitk.chunk(block_m * block_n // (32 * num_warps))
    part, cnt = splitk.workspace(split, m, n, x.device), splitk.counters(x.device, grid[0])
    if words:  # the product's WORDS form (ops/matmul/gptq_mma.py, decision 024) over GPTQ's own words
        MM.gptq_mma_kernel[grid](x, qb, zeros, scales, x, y, part, cnt, m, n, k, k_per_split, group_size, x.stride(0),
                                 BITS=4, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, HAS_PERM=False,
                                 S_CHUNK=s_chunk, PDL=False, FP16_MAGIC=magic, WORDS=True,
                                 num_warps=num_warps, num_stages=num_stages)
    else:
        mma_bytes_kernel[grid](x, qb, zeros, scales, y, part, cnt, m, n, k, k_per_split, group_size, x.stride(0),
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, S_CHUNK=s_chunk, MAGIC=magic,
                               num_warps=num_warps, num_stages=num_stages)
    return y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,4,16,64")
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget-s", type=float, default=300)
    a = ap.parse_args()
    t_start = time.time()
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, copy {copy_bw / 1e9:.0f} GB/s, triton {triton.__version__}", flush=True)
    rows = []
    for n, k in SHAPES:
        lin = make_layer(n, k, act_order=False)
        facts = lin._gptq_kernel
        qb = to_bytes(lin.qweight)
        w32 = lin.dequantized(torch.float32)
        for m in [int(v) for v in a.ms.split(",")]:
            if time.time() - t_start > a.budget_s:
                print("budget spent", flush=True)
                break
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = x.float() @ w32.t()
            nbytes = gemv_bytes(lin, m)
            rel = lambda y: float((y.float() - ref).abs().max() / ref.abs().max())  # noqa: E731
            row = {"N": n, "K": k, "M": m, "bytes": nbytes}
            if m <= 8:
                row["gemv_us"] = bench(lambda: G.gptq_gemv(x, lin.qweight, lin.gptq_zeros, lin.scales, None, 4, 128,
                                                           facts["block_r"]))
            if m >= 4:
                mma = lambda **kw: MM.gptq_mma(x, lin.qweight, lin.gptq_zeros, lin.scales, None, 4, 128,  # noqa: E731
                                               facts["mma_block_k"], **kw)
                row["mma_us"] = bench(lambda: mma())
                row["mma_err"] = rel(mma())
            for name, qt in (("bytes", qb), ("words", lin.qweight)):
                def run(bn, nw, st, tp, rep=5, check=False):
                    f = lambda: mma_bytes(x, qt, lin.gptq_zeros, lin.scales.view(torch.float16), 128,  # noqa: E731
                                          block_n=bn, num_warps=nw, num_stages=st, target_programs=tp,
                                          words=name == "words")
                    return rel(f()) if check else bench(f, rep=rep)
                sweep = []
                for bn, nw, st in itertools.product((64, 128, 256), (4, 8), (3, 4)):
                    try:
                        sweep.append({"BLOCK_N": bn, "num_warps": nw, "num_stages": st, "programs": 264,
                                      "us": run(bn, nw, st, 264)})
                    except Exception as exc:
                        sweep.append({"BLOCK_N": bn, "num_warps": nw, "num_stages": st, "error": str(exc)[:120]})
                best = min((s_ for s_ in sweep if "us" in s_), key=lambda s_: s_["us"])
                for tp in (132, 528):
                    sweep.append({**best, "programs": tp, "us": run(best["BLOCK_N"], best["num_warps"],
                                                                    best["num_stages"], tp)})
                best = dict(min((s_ for s_ in sweep if "us" in s_), key=lambda s_: s_["us"]))
                args = (best["BLOCK_N"], best["num_warps"], best["num_stages"], best["programs"])
                best["us"] = run(*args, rep=20)
                row[name] = {"best": best, "err": run(*args, check=True),
                             "pct_copy": 100 * nbytes / (best["us"] * 1e-6) / copy_bw, "sweep": sweep}
            print(f"N {n:5d} K {k:5d} M {m:2d} | gemv {row.get('gemv_us', float('nan')):7.1f} us | mma "
                  f"{row.get('mma_us', float('nan')):7.1f} us | " + " | ".join(
                      f"{nm} {row[nm]['best']['us']:7.1f} us ({row[nm]['pct_copy']:.0f}% copy; BN {row[nm]['best']['BLOCK_N']} "
                      f"w{row[nm]['best']['num_warps']} s{row[nm]['best']['num_stages']} p{row[nm]['best']['programs']}) "
                      f"err {row[nm]['err']:.1e}" for nm in ("bytes", "words")), flush=True)
            rows.append(row)
    for m in sorted({r["M"] for r in rows}):
        sel = [r for r in rows if r["M"] == m]
        if len(sel) == len(SHAPES):
            tot = {key: 32 * sum(r.get(key, float("nan")) for r in sel) / 1e3 for key in ("gemv_us", "mma_us")}
            for nm in ("bytes", "words"):
                tot[nm] = 32 * sum(r[nm]["best"]["us"] for r in sel) / 1e3
            print(f"8B step matmuls at M={m}: " + ", ".join(f"{kk} {v:.2f} ms" for kk, v in tot.items()), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_GBps": copy_bw / 1e9, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
