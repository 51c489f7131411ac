"""Where a decode step's time goes on a GPU: kernels of the graphed and the eager step, by name and by kind.

    python benchmarks/profile_decode_gpu.py [--quant float,q4_0] [--batches 1,32] [--context 512]
        [--attn-kernel build/baseline/paged_decode_old.py] [--micro]

Loads the random-weight model as `decode_step_gpu.py` does (triton rung, paged cache). Per (quant,
batch): the step's memory roofline (weight bytes + KV bytes ÷ a measured copy bandwidth), the
graph replay time, the eager forward's wall time, and torch.profiler's CUDA kernels over a few
replays and a few eager forwards: the top kernels with their share of the step, and the sum of
kernel time against the wall time (the rest is launch gaps and Python, which graphs remove).
`--attn-kernel FILE` swaps in another paged_decode module (e.g. an older revision) for a before/after.
`--micro` adds isolated timings: decode attention variants (block, warps, heads per program, min
split) at graph-like bounds, and cuBLAS against the Triton F16 GEMV on the model's shapes.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from lowgear.ops import attention as attn_kernels
from lowgear.attention.metadata import build_metadata
from lowgear.bench.command import PRESETS, Timer, kv_bytes, measure_bandwidth, step_weight_bytes
from lowgear.bench.models import synthetic_model
from lowgear.engine.graphs import DecodeGraphs, DecodeRow

PAGE = 256


def use_attention_module(path: str) -> None:
    """Make the triton rung call `path`'s paged_decode instead of the package's."""
    spec = importlib.util.spec_from_file_location("paged_decode_alt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    original = attn_kernels.load

    def load(interpret: bool):
        _, prefill = original(interpret)
        return module, prefill

    attn_kernels.load = load


def kind_of(name: str) -> str:
    n = name.lower()
    if "paged_decode" in n:
        return "attention"
    if n.startswith(("gptq_gemv", "exl2_gemv")):
        return "packed gemv (triton)"
    if n.startswith("gptq_mma"):
        return "packed tl.dot (triton)"
    if n.startswith("gemv_") and "float" not in n:
        return "packed gemv (triton)"
    if "gemv_float" in n:
        return "f16 gemv (triton)"
    if "dequant" in n:
        return "dequant tile (triton)"
    if any(t in n for t in ("gemm", "gemv", "cutlass", "sm90", "xmma", "splitk")):
        return "cuBLAS"
    if "rms" in n or "norm" in n:
        return "rmsnorm"
    if "rope" in n:
        return "rope + kv write"
    if "index" in n or "scatter" in n:
        return "kv write / index"
    if "memcpy" in n or "memset" in n:
        return "memcpy/memset"
    return "elementwise/other"


def kernel_table(fn, steps: int) -> tuple[dict[str, list], float]:
    """{kernel name: [µs per step, launches per step]} over `steps` calls of fn, and the µs sum."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    agg: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = getattr(e, "device_time", None)
        if t is None:
            t = e.cuda_time
        agg[e.name][0] += t / steps
        agg[e.name][1] += 1 / steps
    return agg, sum(v[0] for v in agg.values())


def print_table(title: str, agg: dict[str, list], total_us: float, wall_us: float, top: int) -> None:
    print(f"    {title}: kernels {total_us / 1e3:.2f} ms of {wall_us / 1e3:.2f} ms wall "
          f"({100 * total_us / wall_us:.0f}%; gaps {max(0.0, wall_us - total_us) / 1e3:.2f} ms)")
    kinds: dict[str, float] = defaultdict(float)
    for name, (us, _) in agg.items():
        kinds[kind_of(name)] += us
    print("      by kind: " + ", ".join(f"{k} {us / 1e3:.2f} ms ({100 * us / wall_us:.0f}%)"
                                       for k, us in sorted(kinds.items(), key=lambda kv: -kv[1])))
    for name, (us, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"      {us / 1e3:7.3f} ms {100 * us / wall_us:5.1f}%  x{n:5.0f}  {name[:110]}")


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of fn, from one CUDA graph of `reps` calls (no launch gaps)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / reps)
    return sorted(times)[len(times) // 2]


def profile_model(a, spec, quant: str, dev: torch.device, bandwidth: float) -> None:
    batches = [int(b) for b in a.batches.split(",")]
    timer = Timer(dev)
    cache_tokens = max(batches) * (-(-(a.context + 48) // PAGE) + 1) * PAGE + 2 * PAGE
    model, cache = synthetic_model(spec, quant, dev, cache_tokens, PAGE)
    graphs = DecodeGraphs(model, cache, max(batches), cache.capacity_tokens)
    print(f"{spec.name} {quant}: cache {cache_tokens} tokens (graph kv bound), bandwidth {bandwidth / 1e12:.2f} TB/s",
          flush=True)
    for b in batches:
        per_seq = -(-(a.context + 1) // PAGE)
        pages = cache.pool.allocate(b * per_seq)
        tables = [pages[s * per_seq : (s + 1) * per_seq] for s in range(b)]
        meta = build_metadata([1] * b, [a.context + 1] * b, tables, PAGE, device=dev)
        ids = torch.randint(0, spec.vocab_size, (b,), device=dev)
        rows = [DecodeRow(5, a.context + 1, t) for t in tables]
        graphs.run(rows)
        replay = timer.median(lambda: graphs.run(rows), 3, 20)
        eager = timer.median(lambda: model.forward(ids, meta, cache), 3, 10)
        nbytes = step_weight_bytes(model, b) + kv_bytes(spec, torch.float16, b * (a.context + 1))
        roof = nbytes / bandwidth
        print(f"  bs {b} ctx {a.context}: roofline {roof * 1e3:.2f} ms ({nbytes / 1e9:.2f} GB) | graph replay "
              f"{replay * 1e3:.2f} ms = {100 * roof / replay:.0f}% of roofline | eager forward {eager * 1e3:.2f} ms",
              flush=True)
        agg, total = kernel_table(lambda: graphs.run(rows), 5)
        print_table("graph replay", agg, total, replay * 1e6, a.top)
        agg, total = kernel_table(lambda: model.forward(ids, meta, cache), 3)
        print_table("eager forward", agg, total, eager * 1e6, 6)
        cache.pool.release(pages)
    graphs.release()


def micro_attention(old_path: str | None, only_defaults: bool = False) -> None:
    """Decode attention alone, Llama-3-8B heads (32 q / 8 kv, dim 128), fp16, page 256, CUDA-graph timed."""
    dev = torch.device("cuda:0")
    decode, _ = attn_kernels.load(False)
    old = None
    if old_path:
        spec = importlib.util.spec_from_file_location("paged_decode_old", old_path)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    per_sm = decode.fma_form()[1]

    heads, kvh, dim = 32, 8, 128
    bound = 33280  # the graph's kv bound in decode_step_gpu.py at batch 32
    print(f"decode attention alone (32/8 heads, dim 128, fp16, page {PAGE}); µs per layer and TB/s of KV read")
    variants = [("old", None)] if old else []
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for name in ("bn16 w2 hpp4 min256 pps4 st3", "bn16 w1 hpp4 min16 pps4 st3", "bn16 w1 hpp4 min16 pps8 st3",
                 "bn16 w1 hpp4 min16 pps16 st3", "bn16 w1 hpp4 min16 pps32 st3", "bn16 w1 hpp4 min16 pps8 st1",
                 "bn16 w1 hpp4 min16 pps16 st1", "bn16 w1 hpp4 min16 pps16 st4", "bn32 w1 hpp4 min32 pps8 st3",
                 "bn32 w1 hpp4 min32 pps16 st3", "bn16 w1 hpp2 min16 pps16 st3", "bn16 w1 hpp1 min16 pps16 st3",
                 "bn32 w2 hpp4 min32 pps16 st3", "bn16 w1 hpp4 min64 pps16 st3")[: 0 if only_defaults else None]:
        bn, w, hpp, ms, pps, st = (int(part.lstrip("bnwhpmist")) for part in name.split())
        variants.append((name, dict(block_n=bn, num_warps=w, heads_per_program=hpp, min_split=ms,
                                    target_programs=pps * sms, num_stages=st)))
    for b, ctx in ((1, 512), (32, 512), (64, 1024), (8, 4096)):
        per_seq = -(-ctx // PAGE)
        layer_bytes = 2 * b * ctx * kvh * dim * 2
        layers = max(1, min(64, math.ceil(256e6 / layer_bytes)))  # step through more KV than L2 holds
        caches = [(torch.randn(b * per_seq, PAGE, kvh, dim, device=dev, dtype=torch.float16),
                   torch.randn(b * per_seq, PAGE, kvh, dim, device=dev, dtype=torch.float16)) for _ in range(layers)]
        tables = torch.arange(b * per_seq, device=dev, dtype=torch.int32).view(b, per_seq)
        tables = torch.cat([tables, torch.zeros(b, bound // PAGE - per_seq, dtype=torch.int32, device=dev)], 1)
        kv_lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        q = torch.randn(b, heads, dim, device=dev, dtype=torch.float16)
        out = torch.empty_like(q)
        results = []
        for name, kw in variants:
            mod = old if kw is None else decode
            kw = kw or {"target_programs": 4 * sms}
            for label, max_kv in (("graph", bound),):
                def fn():
                    for kc, vc in caches:
                        mod.paged_decode(q, kc, vc, tables, kv_lens, 0.088, max_kv, out=out, **kw)
                try:
                    t = graph_time(fn, reps=2) / layers
                except Exception as exc:  # a variant that does not compile is reported, not fatal
                    print(f"    {name}: {type(exc).__name__}: {str(exc)[:100]}")
                    break
                results.append((t, name, label))
        print(f"  bs {b} ctx {ctx}: {layer_bytes / 1e6:.1f} MB of KV per layer, {layers} layers cycled")
        shown = [r for r in results if r[1] == "old"] + sorted(r for r in results if r[1] != "old")
        for t, name, label in shown:
            print(f"    {name:28s} {label:5s} {t * 1e6:8.1f} µs  {layer_bytes / t / 1e12:5.2f} TB/s")
        t = graph_time(lambda: [decode.paged_decode(q, kc, vc, tables, kv_lens, 0.088, bound, out=out,
                                                    target_programs=per_sm * sms) for kc, vc in caches], reps=2) / layers
        print(f"    (package defaults, {per_sm} programs/SM) {t * 1e6:8.1f} µs  {layer_bytes / t / 1e12:5.2f} TB/s")
        del caches


def micro_gemv() -> None:
    from lowgear.ops.matmul.gguf_gemv import packed_gemv

    dev = torch.device("cuda:0")
    print("fp16 linear alone, CUDA-graph timed: cuBLAS (torch.matmul) vs Triton F16 GEMV; TB/s of weight read")
    for n, k in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096)):
        copies = max(1, min(8, math.ceil(256e6 / (n * k * 2))))
        ws = [torch.randn(n, k, device=dev, dtype=torch.float16) for _ in range(copies)]
        line = f"  {n:6d}x{k:5d}:"
        for m in (1, 4, 32, 64):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            t_cublas = graph_time(lambda: [torch.matmul(x, w.t()) for w in ws], reps=2) / copies
            line += f"  M={m} cuBLAS {t_cublas * 1e6:6.1f} µs {n * k * 2 / t_cublas / 1e12:4.2f}"
            if m <= 4:
                t_tri = graph_time(lambda: [packed_gemv(x, "F16", w, n, k) for w in ws], reps=2) / copies
                line += f" / triton {t_tri * 1e6:6.1f} µs {n * k * 2 / t_tri / 1e12:4.2f}"
        print(line, flush=True)
        del ws


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--quant", default="float,q4_0")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--attn-kernel", default=None, help="a paged_decode.py to use instead of the package's")
    ap.add_argument("--micro", action="store_true")
    ap.add_argument("--micro-defaults-only", action="store_true", help="attention micro-benchmark: old and package defaults only")
    ap.add_argument("--no-model", action="store_true")
    a = ap.parse_args()
    dev = torch.device("cuda:0")
    torch.manual_seed(0)
    if a.micro:
        micro_attention(a.attn_kernel, a.micro_defaults_only)
        if not a.micro_defaults_only:
            micro_gemv()
    if a.no_model:
        return
    if a.attn_kernel:
        use_attention_module(a.attn_kernel)
        print(f"attention kernel from {a.attn_kernel}")
    bandwidth = measure_bandwidth(Timer(dev), quick=False)
    for quant in a.quant.split(","):
        profile_model(a, PRESETS[a.preset], quant, dev, bandwidth)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
