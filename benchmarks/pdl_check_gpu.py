"""Where a kernel may release its dependents under programmatic dependent launch (sm_90+), checked by tokens.

Runs a small synthetic Q4_0 model (GPTQ kernels after repacking, triton rung, float16) through the
CUDA-graphed DynamicGenerator at batch 2, 4 and 8, greedy, and compares its tokens with the same
generator under LOWGEAR_NO_PDL-style plain launches. `--release` picks where kernels signal
`griddepcontrol.launch_dependents`: "late" (lowgear's: the split-K GEMVs after their main loop, the
rest at exit), "exit" (all at exit) or "early" (every kernel right after its wait: the next kernel is
resident for the whole of this one). On the H100 of benchmarks/results/h100-session4/pdl/ "early"
gave other tokens at batch 8 and the other two the plain launches' tokens.

    python benchmarks/pdl_check_gpu.py --release late
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

import lowgear as lg
from lowgear import pdl
from lowgear.synthetic import write_gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", choices=("late", "exit", "early"), default="late")
    ap.add_argument("--path", default="/tmp/pdl_check.gguf")
    a = ap.parse_args()
    if a.release == "exit":
        @triton.jit
        def release(PDL: tl.constexpr):
            pass
        pdl.release = release
    elif a.release == "early":
        @triton.jit
        def wait(PDL: tl.constexpr):
            if PDL:
                gdc_wait()
                gdc_launch_dependents()
        pdl.wait = wait
    on = {"value": False}
    plain_launch = pdl.launch
    pdl.launch = lambda device: plain_launch(device) if on["value"] else {"PDL": False}

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

    want = {n: run(n) for n in (2, 4, 8)}
    on["value"] = True
    got = {n: run(n) == want[n] for n in (2, 4, 8)}
    print(f"release {a.release}: tokens equal to plain launches at batch 2/4/8: {got}")
    sys.exit(0 if all(got.values()) else 1)


if __name__ == "__main__":
    main()
