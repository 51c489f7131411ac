"""Where a kernel may release its dependents under programmatic dependent launch (sm_90+), checked by tokens.

Runs a small synthetic Q4_0 model (GPTQ kernels after repacking, triton rung, float16) through the
CUDA-graphed DynamicGenerator at batch 1, 2, 4 and 8, greedy, and compares its tokens with the same
generator under plain launches, for each release mode of pdl.py (LOWGEAR_PDL_RELEASE: "loop", the
split-K GEMVs after their main loop and the rest at exit; "wait", every kernel right after its wait;
"start", every kernel just before its wait; "auto", the default: wait at batch 1, loop above). Batch 8 runs the tl.dot kernel (gptq_mma.py): on the H100 of
benchmarks/results/h100-llama3-8b-gptq-gemv-tiles-pdl/pdl/ a release right after the wait gave other tokens there, while
its pipelined loop read x before its wait.

    python benchmarks/experiments/pdl_check_gpu.py --modes auto,loop,wait,start

(benchmarks/results/h200-llama3-8b-pdl-release/pdl_check.log was run at commit 9b304c3, when a mode also named an
L2 prefetch budget in MB, as `wait:0`; that prefetch was measured slower and removed.)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import lowgear as lg
from lowgear.bench.synthetic import write_gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="auto,loop,wait,start", help="release modes, comma-separated")
    ap.add_argument("--path", default="/tmp/pdl_check.gguf")
    a = ap.parse_args()

    write_gguf(a.path, arch="llama", hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2,
               intermediate_size=1024, qtype="Q4_0", seed=5)
    config = lg.Config(a.path)
    config.devices, config.dtype, config.attn_backend = ["0"], "float16", "triton"
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=8192, page_size=16)
    model.load_autosplit(cache)
    tok = lg.Tokenizer(config)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (5, 40, 17, 1, 64, 9, 33, 100)]

    def run(n: int) -> list[list[int]]:
        gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tok, max_batch_size=8)
        gen.warmup()
        jobs = [lg.DynamicJob(p, max_new_tokens=16, gen_settings=lg.Sampler.Settings.greedy()) for p in prompts[:n]]
        gen.enqueue(jobs)
        while any(not j.finished for j in jobs):
            gen.iterate()
        gen.graphs.release()
        return [j.generated for j in jobs]

    os.environ["LOWGEAR_NO_PDL"] = "1"
    batches = (1, 2, 4, 8)
    want = {n: run(n) for n in batches}
    del os.environ["LOWGEAR_NO_PDL"]
    ok = True
    for mode in a.modes.split(","):
        os.environ["LOWGEAR_PDL_RELEASE"] = mode
        got = {n: run(n) == want[n] for n in batches}
        print(f"release {mode}: tokens equal to plain launches at batch 1/2/4/8: {got}", flush=True)
        ok &= all(got.values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
