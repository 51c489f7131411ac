"""Time to first token for prompt lengths the process has not seen: the sdpa rung with and without torch's cuDNN attention.

    python benchmarks/experiments/sdpa_new_lengths_gpu.py [--preset llama3-8b] [--quant gptq4]

Where torch's sdpa picks its cuDNN kernels (Hopper), each new query / key length builds a cuDNN
graph before it runs. A server sees a new prompt length with nearly every request, so that cost
lands on the time to first token. The sdpa rung leaves cuDNN out of its calls (attention/sdpa.py);
`sdpa+cudnn` here undoes that (torch picks as it likes, as the rung did before), and `triton` is the
rung that never calls sdpa. Per config: eight prompts of lengths not used before (random tokens,
one request at a time, one new token each), then eight more of the same lengths: the mean of each
and their difference. A priming round first compiles the Triton kernels' variants for both kinds
of lengths (a multiple of 16 or not), so no config pays for that. Random weights of the preset's
shape, float16, one GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import lowgear as lg
from lowgear.bench.command import PRESETS
from lowgear.attention import sdpa
from lowgear.bench.models import _NullTokenizer, synthetic_model

LEAVE_OUT = sdpa.without_cudnn


def ttft(gen, n: int, g: torch.Generator, vocab: int) -> float:
    job = lg.DynamicJob(input_ids=torch.randint(0, vocab, (n,), generator=g).tolist(), max_new_tokens=1,
                        gen_settings=lg.Sampler.Settings.greedy())
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    gen.enqueue(job)
    while not job.finished:
        gen.iterate()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--quant", default="gptq4")
    ap.add_argument("--configs", default="sdpa,sdpa+cudnn,triton")
    a = ap.parse_args()
    spec = PRESETS[a.preset]
    dev = torch.device("cuda:0")
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, {spec.name} {a.quant}, float16", flush=True)
    g = torch.Generator().manual_seed(0)
    base = 301
    models = {}
    for config in a.configs.split(","):
        rung = config.split("+")[0]
        sdpa.without_cudnn = contextlib.nullcontext if config.endswith("+cudnn") else LEAVE_OUT
        if rung not in models:
            models.clear()
            torch.cuda.empty_cache()
            model, cache = synthetic_model(spec, a.quant, dev, 8192, 256, backend=rung)
            cache.pool.lookup_prefix = lambda keys: []  # every prompt prefilled in full
            gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=_NullTokenizer(spec.vocab_size),
                                      max_batch_size=1)
            gen.warmup()
            models[rung] = gen
            for n in (200, 201, 208, 215, 224):  # priming: Triton variants for lengths = 0 and != 0 mod 16
                ttft(gen, n, g, spec.vocab_size)
        gen = models[rung]
        lengths = [base + 7 * i for i in range(8)]
        base += 100
        first = [ttft(gen, n, g, spec.vocab_size) for n in lengths]
        again = [ttft(gen, n, g, spec.vocab_size) for n in lengths]
        f, s = statistics.mean(first) * 1e3, statistics.mean(again) * 1e3
        print(f"{config:12s} lengths {lengths[0]}-{lengths[-1]}: new {f:7.1f} ms, seen {s:7.1f} ms, "
              f"a new length costs {f - s:6.1f} ms (new, each: {' '.join(f'{x * 1e3:.0f}' for x in first)})", flush=True)
    sdpa.without_cudnn = LEAVE_OUT


if __name__ == "__main__":
    main()
