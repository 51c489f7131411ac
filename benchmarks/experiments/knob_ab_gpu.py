"""Any module constant of lowgear inside whole graphed decode steps: an interleaved A/B.

    python benchmarks/experiments/knob_ab_gpu.py "default" "ops.attention.paged_decode.MIN_SPLIT=128" \
        [--quant gptq4] [--batches 1,16] [--rounds 2]

Each config is `default` or comma-separated `module.NAME=value` settings (module relative to
lowgear, value a Python literal), set on the module before the config's generator is built and
put back after; the launch code must read the constant at call time (the launch rules of the
kernels do). One Llama-3-8B-shape model (random weights), float16, triton rung, context 512; per
config and batch the mean step over 48 graphed steps, its share of the memory roofline and whether
its greedy tokens equal the first config's (step_ab.py).
"""

from __future__ import annotations

import argparse
import ast
import importlib

import torch
from step_ab import cache_tokens, interleaved_steps  # benchmarks/, beside this file

from lowgear.bench.command import PRESETS, Timer, measure_bandwidth
from lowgear.bench.models import synthetic_model

STEPS = 48  # graphed steps a timing


def parse(config: str) -> list[tuple[object, str, object]]:
    if config == "default":
        return []
    out = []
    for item in config.split(","):
        target, value = item.split("=", 1)
        module, name = target.rsplit(".", 1)
        mod = importlib.import_module(f"lowgear.{module}")
        if not hasattr(mod, name):
            raise SystemExit(f"lowgear.{module} has no {name}")
        out.append((mod, name, ast.literal_eval(value)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--quant", default="gptq4")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    settings = {c: parse(c) for c in a.configs}
    originals = {(mod, name): getattr(mod, name) for s in settings.values() for mod, name, _ in s}
    batches = [int(b) for b in a.batches.split(",")]
    spec, dev = PRESETS["llama3-8b"], torch.device("cuda:0")
    bw = measure_bandwidth(Timer(dev), quick=False)
    print(f"{torch.cuda.get_device_name(dev)} copy {bw / 1e12:.2f} TB/s, {spec.name} {a.quant}, context {a.context}",
          flush=True)
    model, cache = synthetic_model(spec, a.quant, dev, cache_tokens(batches, a.context, STEPS), 256)

    def apply(config):
        for (mod, name), value in originals.items():
            setattr(mod, name, value)
        for mod, name, value in settings[config]:
            setattr(mod, name, value)

    for r in interleaved_steps(model, cache, spec, a.configs, apply, batches, a.context, STEPS, a.rounds, bw):
        print(f"r{r['round']} bs={r['batch']:3d} {r['ms']:7.3f} ms {100 * r['roofline']:5.1f}%  tokens "
              f"{'same' if r['tokens_equal_first'] else 'DIFFER'}  {r['config']}", flush=True)
    apply("default")


if __name__ == "__main__":
    main()
