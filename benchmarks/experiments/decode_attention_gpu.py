"""Paged decode attention alone on the GPU: the FMA forms against the tl.dot form, over launch choices.

    python benchmarks/experiments/decode_attention_gpu.py [--forms fma,split,dot] [--out OUT.json]

Llama-3-8B attention shape (32 query heads, 8 kv heads, head_dim 128, fp16, 256-position pages),
one layer's decode for batch x context, launched as the CUDA graph launches it: the kv bound is a
cache capacity far above the real lengths (65,536 positions), the split count from the target
programs per SM. `--forms` picks the forms timed: "fma", the whole-warp FMA form (split_d 0, as the
rung launched it before split_d: 16 one-warp programs per SM, and at 4 and 8); "split", the FMA form
with `split_d` lanes across head_dim (paged_decode's split_d: 4 or 8, blocks of 16 or 32 positions,
4, 8 or 16 one-warp programs per SM; the rung's FMA launch is split_d 4, 16, 4/SM); "dot", the
tl.dot sweep (2, 4 or 8 programs per SM). The one-warp FMA programs use 255 registers, so an H100 SM holds 8:
a split count that makes 1,024 programs (4/SM at batch 64) runs in one wave, 2,560 (16/SM) in three.
Timed as CUDA-graph replays of 8 layers' worth of calls over 8 distinct caches (so K/V come from
HBM, not L2); reported per layer, and as TB/s of K/V bytes read. Each variant's output is checked
against the whole-warp FMA form's first.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton.testing

from lowgear.ops.attention import load

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 256
CASES = [(1, 512), (1, 4096), (16, 1024), (64, 1024), (64, 4096)]
BOUND = 65536
LAYERS = 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--forms", default="fma,split,dot",
                    help="comma-separated, of: fma (whole-warp FMA form), split (split_d FMA form), dot (tl.dot)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    forms = set(a.forms.split(","))
    assert forms <= {"fma", "split", "dot"}, forms
    decode, _ = load(interpret=False)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    t0 = time.perf_counter()
    for batch, ctx in CASES:
        pages_per_seq = -(-ctx // PAGE)
        pool = batch * pages_per_seq
        g = torch.Generator(device="cuda").manual_seed(0)
        caches = [(torch.randn(pool, PAGE, KV_HEADS, HEAD_DIM, device="cuda", generator=g).half(),
                   torch.randn(pool, PAGE, KV_HEADS, HEAD_DIM, device="cuda", generator=g).half())
                  for _ in range(LAYERS)]
        tables = torch.randperm(pool, device="cuda", generator=g).int().view(batch, pages_per_seq)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", generator=g).half()
        kv_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * 2

        def run(**kw):
            return [decode.paged_decode(q, kc, vc, tables, lens, HEAD_DIM**-0.5, BOUND, **kw) for kc, vc in caches]

        ref = run(split_d=0, target_programs=16 * sms)[0].float()
        variants = []
        if "fma" in forms:
            # the whole-warp form as the rung launched it before split_d (16 programs/SM), and at 4 and 8
            variants += [("fma", {"split_d": 0, "target_programs": 16 * sms})]
            variants += [(f"fma {per_sm}/SM", {"split_d": 0, "target_programs": per_sm * sms}) for per_sm in (4, 8)]
        if "split" in forms:
            for sd in (4, 8):
                for bn in (16, 32):
                    for per_sm in (4, 8, 16):
                        variants.append((f"split_d{sd} bn{bn} {per_sm}/SM",
                                         {"split_d": sd, "block_n": bn, "target_programs": per_sm * sms}))
        if "dot" in forms:
            for bn in (32, 64, 128):
                for warps in (4, 8):
                    for per_sm in (2, 4, 8):
                        variants.append((f"dot bn{bn} w{warps} {per_sm}/SM",
                                         dict(use_dot=True, block_n=bn, num_warps=warps, target_programs=per_sm * sms)))
        for name, kw in variants:
            err = float((run(**kw)[0].float() - ref).abs().max())
            us = triton.testing.do_bench_cudagraph(lambda kw=kw: run(**kw), rep=30, return_mode="median") * 1e3 / LAYERS
            results.append({"batch": batch, "context": ctx, "variant": name, "us_per_layer": us,
                            "TBps": kv_bytes / us / 1e6, "max_abs_diff_vs_fma": err})
        here = [r for r in results if (r["batch"], r["context"]) == (batch, ctx)]
        parts = []
        for label, keep in (("fma", lambda v: v == "fma"), ("split best", lambda v: v.startswith("split_d")),
                            ("dot best", lambda v: v.startswith("dot"))):
            rows = [r for r in here if keep(r["variant"])]
            if rows:
                best = min(rows, key=lambda r: r["us_per_layer"])
                name = "" if label == "fma" else f" {best['variant']}:"
                parts.append(f"{label}{name} {best['us_per_layer']:7.1f} us ({best['TBps']:.2f} TB/s, "
                             f"max diff {best['max_abs_diff_vs_fma']:.1e})")
        default = [r for r in here if r["variant"] == f"dot bn{decode.DOT_BLOCK_N} w{decode.DOT_NUM_WARPS} "
                   f"{decode.dot_programs_per_sm(batch)}/SM"]  # what the rung launches
        if default:
            parts.append(f"dot default {default[0]['us_per_layer']:7.1f} us ({default[0]['TBps']:.2f} TB/s)")
        print(f"bs {batch:3d} ctx {ctx:5d}: " + " | ".join(parts), flush=True)
        for r in here:
            if not r["variant"].startswith("dot"):
                print(f"    {r['variant']:22s} {r['us_per_layer']:7.1f} us ({r['TBps']:.2f} TB/s)", flush=True)
        del caches
    print(f"{time.perf_counter() - t0:.0f} s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
