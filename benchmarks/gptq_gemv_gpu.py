"""GPTQ decode kernels on the GPU: bandwidth per Llama-3-8B shape, sweeps of launch choices, and checks.

    python benchmarks/gptq_gemv_gpu.py --out benchmarks/results/gptq_gemv.json [--quick]
    TRITON_INTERPRET=1 python benchmarks/gptq_gemv_gpu.py --cpu-smoke   # the script's logic, tiny shapes

For (N, K) in the 8B layer shapes, 4-bit group 128, act-order off and on, M in {1, 4, 8, 16, 64}: the
GEMV (`lowgear.ops.matmul.gptq_gemv.gptq_gemv`, M <= 16 only) at its default launch parameters and over
a sweep of num_warps x split-K (x the x-gather mode for act-order), and at M >= 8 the tl.dot kernel
(`gptq_mma.gptq_mma`, what gptq_matmul runs for MAX_M < M <= 64 on sm_80+) at its defaults and, without
--quick, over BLOCK_N x split-K x num_warps; all timed as CUDA-graph replays
(triton.testing.do_bench_cudagraph, so launch overhead is what a captured decode step pays).
Reported: packed bytes read (qweight + scales + fp16 zeros + perm) / time, that as % of the copy
bandwidth measured here (clone of 1 GiB: 2 GiB moved), fp16 torch.matmul on the same shape, the
prefill path (dequantize + cuBLAS) at M >= 4, and max |error| / max |ref| of each kernel against
torch dequantize_gptq + matmul. One line per case; the best sweep point per case is what to make
the default, and the GEMV / tl.dot / prefill columns place MAX_M and MMA_MAX_M.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton
import triton.testing

from lowgear.model.linear import QuantLinear
from lowgear.ops import matmul as kernels
from lowgear.formats.gptq import GPTQWeight
from lowgear.ops.matmul import gptq_gemv as G
from lowgear.ops.matmul import gptq_mma as MM

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # (N, K): qkvo / kv / gate-up / down
DEVICE = "cuda"


def bench(fn, rep: int = 20) -> float:
    """Median microseconds of fn as a CUDA-graph replay (plain do_bench if graphs fail)."""
    if DEVICE == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3
    except Exception:
        return triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device clone (read + write) of 1 GiB."""
    if DEVICE == "cpu":
        return 1e10
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    ms = triton.testing.do_bench(lambda: a.clone(), warmup=5, rep=50, return_mode="median")
    del a
    return 2 * (1 << 30) / (ms * 1e-3)


def make_layer(n: int, k: int, act_order: bool, seed: int = 0) -> QuantLinear:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    bits, gs = 4, 128
    qweight = torch.randint(-(1 << 31), 1 << 31, (k // 8, n), generator=g, device=DEVICE, dtype=torch.int64).to(torch.int32)
    qzeros = torch.randint(-(1 << 31), 1 << 31, (k // gs, n // 8), generator=g, device=DEVICE, dtype=torch.int64).to(torch.int32)
    scales = (torch.rand((k // gs, n), generator=g, device=DEVICE) * 0.01 + 0.001).half()
    g_idx = None
    if act_order:
        g_idx = (torch.arange(k, device=DEVICE) // gs)[torch.randperm(k, generator=g, device=DEVICE)].to(torch.int32)
    lin = QuantLinear(GPTQWeight(qweight, qzeros, scales, g_idx, bits, gs, False, 1))
    lin.kernel = kernels.kernel_for(lin)
    return lin


def gemv_bytes(lin: QuantLinear, m: int) -> int:
    parts = [lin.qweight, lin.scales, lin.gptq_zeros] + ([lin.gptq_perm] if lin._gptq_kernel["sorted"] else [])
    return sum(t.numel() * t.element_size() for t in parts) + m * lin.in_features * 2 + m * lin.out_features * 2


def run_case(lin: QuantLinear, m: int, copy_bw: float, quick: bool) -> dict:
    n, k = lin.out_features, lin.in_features
    facts = lin._gptq_kernel
    sorted_ = facts["sorted"]
    qweight = lin.qweight  # sorted in place by prepare for act-order
    perm = lin.gptq_perm if sorted_ else None
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)

    def gemv(**kw):
        return G.gptq_gemv(x, qweight, lin.gptq_zeros, lin.scales, perm, 4, 128, facts["block_r"], **kw)

    def mma(**kw):
        return MM.gptq_mma(x, qweight, lin.gptq_zeros, lin.scales, perm, 4, 128, facts["mma_block_k"], **kw)

    w32 = lin.dequantized(torch.float32)  # columns back in input order (prepare sorted act-order in place)
    ref = x.float() @ w32.t()

    def rel(y):
        return float((y.float() - ref).abs().max() / ref.abs().max())

    w16 = w32.half()
    del w32
    nbytes = gemv_bytes(lin, m)
    t_fp16 = bench(lambda: x @ w16.t())
    t_prefill = bench(lambda: _prefill(lin, x)) if m >= 4 else None
    out = {"N": n, "K": k, "act_order": sorted_, "M": m, "bytes": nbytes, "fp16_matmul_us": t_fp16,
           "prefill_path_us": t_prefill, "rel_err": 0.0}
    if m >= 4:  # where the tl.dot kernel could take over from the GEMV
        out["mma"] = run_mma(mma, n, k, m, nbytes, copy_bw, quick)
        out["rel_err"] = rel(mma())
    if m > 16:  # the GEMV's work grows with M: no point past the rows it could serve
        return out
    err = rel(gemv())
    default = G.launch_params(n, k, 4, facts["block_r"], m)
    t_default = bench(lambda: gemv())
    sweep = []
    warps = (2,) if quick else (1, 2, 4, 8)
    splits = (None, 1, 8, 32) if quick else (None, 1, 4, 16, 64)
    modes = ("kernel", "torch") if sorted_ else ("kernel",)
    for nw in warps:
        for sp in splits:
            for mode in modes:
                p = G.launch_params(n, k, 4, facts["block_r"], m, nw, sp)
                if sp is not None and p["split"] != sp and sp > 1:
                    continue  # clamped to the tile count: already covered
                try:
                    us = bench(lambda: gemv(num_warps=nw, split=sp, x_perm=mode), rep=5)
                except Exception as exc:  # an over-large config: record and go on
                    sweep.append({"num_warps": nw, "split": p["split"], "x_perm": mode, "error": str(exc)[:200]})
                    continue
                sweep.append({"num_warps": nw, "split": p["split"], "BLOCK_N": p["BLOCK_N"], "BLOCK_R": p["BLOCK_R"],
                              "x_perm": mode, "us": us})
    best = dict(min((s for s in sweep if "us" in s), key=lambda s: s["us"]))
    best["us"] = bench(lambda: gemv(num_warps=best["num_warps"], split=best["split"], x_perm=best["x_perm"]))
    out.update({"rel_err": max(out["rel_err"], err),
                "default": {**default, "us": t_default, "GBps": nbytes / t_default / 1e3},
                "best": {**best, "GBps": nbytes / best["us"] / 1e3,
                         "pct_copy": 100 * nbytes / (best["us"] * 1e-6) / copy_bw},
                "sweep": sweep})
    return out


def run_mma(mma, n: int, k: int, m: int, nbytes: int, copy_bw: float, quick: bool) -> dict:
    """The tl.dot kernel at its defaults and (without quick) over BLOCK_N x split x num_warps."""
    default = MM.mma_launch_params(n, k, m, 4, MM.mma_block_k(4, 128, k))
    t_default = bench(lambda: mma())
    sweep = []
    if not quick:
        for bn in (32, 64, 128):
            for sp in (None, 1, 2, 4, 8):
                for nw in (4, 8):
                    try:
                        us = bench(lambda: mma(block_n=bn, split=sp, num_warps=nw), rep=5)
                    except Exception as exc:  # an over-large config: record and go on
                        sweep.append({"BLOCK_N": bn, "split": sp, "num_warps": nw, "error": str(exc)[:200]})
                        continue
                    p = MM.mma_launch_params(n, k, m, 4, default["BLOCK_K"], block_n=bn, split=sp, num_warps=nw)
                    sweep.append({"BLOCK_N": bn, "split": p["split"], "num_warps": nw, "us": us})
    best = dict(min((s for s in sweep if "us" in s), key=lambda s: s["us"], default={**default, "us": t_default}))
    if sweep:
        best["us"] = bench(lambda: mma(block_n=best["BLOCK_N"], split=best["split"], num_warps=best["num_warps"]))
    return {"default": {**default, "us": t_default, "GBps": nbytes / t_default / 1e3},
            "best": {"BLOCK_N": best["BLOCK_N"], "split": best["split"], "num_warps": best["num_warps"],
                     "us": best["us"], "GBps": nbytes / best["us"] / 1e3,
                     "pct_copy": 100 * nbytes / (best["us"] * 1e-6) / copy_bw},
            "sweep": sweep}


def _prefill(lin: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The M > MAX_M path at any M: dequantize W.T (one band) + cuBLAS."""
    g = lin._gptq
    wt = G.dequantize_t(lin.qweight, lin.qzeros, lin.scales, lin.g_idx, g["bits"], g["group_size"],
                        g["zero_offset"], 0, lin.out_features, x.dtype)
    return x @ wt


def _interpreter_numpy_shim() -> None:
    """Triton 3.6's interpreter turns a 1-element array into an int with int(arr), which numpy >= 2.3
    refuses, so `range(runtime_int)` loops fail (the tests patch it the same way)."""
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="write all results (sweeps included) as JSON here")
    ap.add_argument("--quick", action="store_true", help="smaller sweep")
    ap.add_argument("--ms", default="1,4,8,16,64")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    global DEVICE, SHAPES
    if args.cpu_smoke:
        DEVICE, SHAPES, args.quick = "cpu", [(264, 256)], True
        _interpreter_numpy_shim()
    t0 = time.time()
    props = torch.cuda.get_device_properties(0) if DEVICE == "cuda" else type("P", (), {"name": "cpu", "multi_processor_count": 0})
    copy_bw = copy_bandwidth()
    print(f"{props.name}, {props.multi_processor_count} SMs, copy bandwidth {copy_bw / 1e9:.0f} GB/s "
          f"(torch {torch.__version__}, triton {triton.__version__}); MAX_M={G.MAX_M}, MMA_MAX_M={MM.MMA_MAX_M}, "
          f"4-bit g128")
    head = (f"{'N':>6} {'K':>6} {'act':>3} {'M':>2} | {'default us':>10} {'GB/s':>6} | {'best us':>8} {'GB/s':>6} "
            f"{'%copy':>5}  {'warps':>5} {'split':>5} {'xperm':>6} | {'fp16 mm us':>10} {'x fp16':>6} | "
            f"{'prefill us':>10} | {'mma us':>7} {'best':>7} {'%copy':>5} {'BN/split/warps':>14} | {'rel err':>8}")
    print(head)
    print("-" * len(head))
    results = []
    for n, k in SHAPES:
        for act in (False, True):
            lin = make_layer(n, k, act)
            for m in (int(v) for v in args.ms.split(",")):
                r = run_case(lin, m, copy_bw, args.quick)
                results.append(r)
                pre = f"{r['prefill_path_us']:10.1f}" if r["prefill_path_us"] is not None else f"{'-':>10}"
                if "best" in r:
                    d, b = r["default"], r["best"]
                    gemv_cols = (f"{d['us']:10.1f} {d['GBps']:6.0f} | {b['us']:8.1f} {b['GBps']:6.0f} "
                                 f"{b['pct_copy']:5.0f}  {b['num_warps']:5d} {b['split']:5d} {b['x_perm']:>6} | "
                                 f"{r['fp16_matmul_us']:10.1f} {r['fp16_matmul_us'] / b['us']:6.2f}")
                else:
                    gemv_cols = (f"{'-':>10} {'-':>6} | {'-':>8} {'-':>6} {'-':>5}  {'-':>5} {'-':>5} {'-':>6} | "
                                 f"{r['fp16_matmul_us']:10.1f} {'-':>6}")
                if "mma" in r:
                    md, mb = r["mma"]["default"], r["mma"]["best"]
                    cfg = f"{mb['BLOCK_N']}/{mb['split']}/{mb['num_warps']}"
                    mma_cols = f"{md['us']:7.1f} {mb['us']:7.1f} {mb['pct_copy']:5.0f} {cfg:>14}"
                else:
                    mma_cols = f"{'-':>7} {'-':>7} {'-':>5} {'-':>14}"
                print(f"{n:6d} {k:6d} {'yes' if act else 'no':>3} {m:2d} | {gemv_cols} | {pre} | {mma_cols} | "
                      f"{r['rel_err']:8.1e}", flush=True)
            del lin
            torch.cuda.empty_cache()
    bad = [r for r in results if not r["rel_err"] < 1e-2]
    print(f"correctness: {'OK' if not bad else f'{len(bad)} cases off'} (max rel err "
          f"{max(r['rel_err'] for r in results):.1e}); {time.time() - t0:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": props.name, "sms": props.multi_processor_count, "copy_GBps": copy_bw / 1e9,
                       "max_m": G.MAX_M, "mma_max_m": MM.MMA_MAX_M, "results": results}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
