"""The GPTQ GEMV's launch rule inside whole graphed decode steps: programs per launch, K-split, tile rows.

    python benchmarks/experiments/gemv_launch_ab_gpu.py 528:8:16,528:8:8 1,2 [--rounds 2]

Each config is TARGET_PROGRAMS:HALF2_MIN_SPLIT:HALF2_TILE_ROWS of quant/kernels/gptq.py (set on the
module, so launch_params picks the launches from it; the first config should be the current rule,
whose greedy tokens the others must equal). One Llama-3-8B-shape GPTQ 4-bit model (random weights),
float16, triton rung, context 512; per config and batch the mean step over 48 graphed steps, the
share of the memory roofline, and each fused linear's launch (splits x column blocks / tiles a program).
Cold single-kernel sweeps are gemv_cold_gpu.py's; this is what they add up to in a step.
"""

from __future__ import annotations

import argparse

import torch
from step_ab import cache_tokens, interleaved_steps  # benchmarks/, beside this file

from lowgear.bench.command import PRESETS, Timer, measure_bandwidth
from lowgear.bench.models import synthetic_model
from lowgear.ops.matmul import gptq_gemv as G

SHAPES = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate|up", 28672, 4096), ("down", 4096, 14336))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", help="TARGET_PROGRAMS:HALF2_MIN_SPLIT:HALF2_TILE_ROWS, comma-separated")
    ap.add_argument("batches", help="decode batch sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    configs = [tuple(int(v) for v in c.split(":")) for c in a.configs.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    spec, dev = PRESETS["llama3-8b"], torch.device("cuda:0")
    bw = measure_bandwidth(Timer(dev), quick=False)
    print(f"{torch.cuda.get_device_name(dev)} copy {bw / 1e12:.2f} TB/s", flush=True)
    ctx, steps = 512, 48
    model, cache = synthetic_model(spec, "gptq4", dev, cache_tokens(batches, ctx, steps), 256)

    def apply(config):
        G.TARGET_PROGRAMS, G.HALF2_MIN_SPLIT, G.HALF2_TILE_ROWS = config

    for r in interleaved_steps(model, cache, spec, configs, apply, batches, ctx, steps, a.rounds, bw):
        (target, min_split, rows), b = r["config"], r["batch"]
        launches = []
        for name, n, k in SHAPES:
            p = G.launch_params(n, k, 4, 16, b, half2=True)
            launches.append(f"{name}:{p['split']}x{-(-n // p['BLOCK_N'])}/{p['rows_per_split'] // p['BLOCK_R']}t")
        print(f"r{r['round']} target {target:4d} min_split {min_split:2d} rows {rows:2d} bs={b}: {r['ms']:6.3f} ms "
              f"{100 * r['roofline']:5.1f}%  tokens {'same' if r['tokens_equal_first'] else 'DIFFER'}  "
              f"[{' '.join(launches)}]", flush=True)


if __name__ == "__main__":
    main()
