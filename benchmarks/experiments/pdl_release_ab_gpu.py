"""A/B of pdl.py's release modes inside whole graphed decode steps (sm_90+).

    python benchmarks/experiments/pdl_release_ab_gpu.py --quant gptq4,float --configs off,auto,loop,wait --batches 1,16 --rounds 2

One Llama-3-8B-shape model per quant (random weights made on the GPU, as `lowgear bench` does), triton
rung, float16. Each config is a release mode (LOWGEAR_PDL_RELEASE) or `off` (LOWGEAR_NO_PDL=1, plain
launches); configs run interleaved, `--rounds` times over (step_ab.py: per config and batch the
mean graphed step, its share of the memory roofline, and whether its greedy tokens equal the first
config's).

The logs of benchmarks/results/h200-llama3-8b-pdl-release/ were run with the code of commits 9b304c3-3eee6fd, when a config also
named an L2 prefetch budget in MB (`wait:16`: each GEMV prefetched its share of 16 MB of weights into
L2 before its wait); that prefetch was measured slower and removed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

from step_ab import cache_tokens, interleaved_steps  # benchmarks/, beside this file

from lowgear.bench.command import PRESETS, Timer, measure_bandwidth
from lowgear.bench.models import synthetic_model


def set_config(config: str) -> None:
    for name in ("LOWGEAR_NO_PDL", "LOWGEAR_PDL_RELEASE"):
        os.environ.pop(name, None)
    if config == "off":
        os.environ["LOWGEAR_NO_PDL"] = "1"
    else:
        os.environ["LOWGEAR_PDL_RELEASE"] = config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--quant", default="gptq4,float")
    ap.add_argument("--configs", default="off,auto,loop,wait")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON file for the results")
    a = ap.parse_args()
    spec = PRESETS[a.preset]
    dev = torch.device("cuda:0")
    batches = [int(b) for b in a.batches.split(",")]
    configs = a.configs.split(",")
    bandwidth = measure_bandwidth(Timer(dev), quick=False)
    print(f"{torch.cuda.get_device_name(dev)}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, {spec.name}, "
          f"context {a.context}, {a.steps} steps a timing", flush=True)
    page = 256
    results = []
    for quant in a.quant.split(","):
        t0 = time.perf_counter()
        model, cache = synthetic_model(spec, quant, dev, cache_tokens(batches, a.context, a.steps, page), page)
        print(f"{quant}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        for r in interleaved_steps(model, cache, spec, configs, set_config, batches, a.context, a.steps, a.rounds,
                                   bandwidth):
            results.append({"quant": quant, **{k: v for k, v in r.items() if k != "seconds"}})
            print(f"{quant:6s} round {r['round']} {r['config']:10s} bs={r['batch']:3d}: {r['ms']:7.3f} ms/step  "
                  f"{100 * r['roofline']:5.1f}% roofline  tokens {'same' if r['tokens_equal_first'] else 'DIFFER'}"
                  f"  ({r['seconds']:.0f} s)", flush=True)
        del model, cache
        gc.collect()
        torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "bandwidth": bandwidth, "preset": spec.name,
                       "context": a.context, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
