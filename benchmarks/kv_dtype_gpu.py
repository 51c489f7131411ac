"""Graphed decode over each KV cache storage on one GPU, side by side in one run: step time and the
tokens a fixed cache budget holds (the 8-bit and 4-bit caches of decision 020).

For each `--kv` storage it builds the same random-weight model (seed 0) with a paged cache of
`--cache-gib` GiB, times `--steps` CUDA-graphed DynamicGenerator decode steps per batch size at
`--context` tokens, and prints ms/step, tokens/s, the cache's capacity in tokens and the step time
relative to the model-dtype cache (`auto`).

    python benchmarks/kv_dtype_gpu.py --preset llama3-8b --quant gptq4 --kv auto,int8,fp8_e4m3,int4 \
        --batch 1,16,64 --context 4096 --cache-gib 8 --out $OUT/kv
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--quant", default="gptq4")
    ap.add_argument("--kv", default="auto,int8,fp8_e4m3,int4")
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--context", default="4096", help="one or more contexts, comma-separated")
    ap.add_argument("--cache-gib", type=float, default=8.0)
    ap.add_argument("--page-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-prefill", action="store_true",
                    help="time graphed decode steps over pages given to each row without computing its prompt "
                         "(the K/V there is whatever the pool holds: step times, not tokens)")
    a = ap.parse_args(argv)

    import lowgear as lg
    from lowgear.bench.models import PRESETS, _NullTokenizer, generator_step_seconds, synthetic_config
    from lowgear.cache.kv import Cache
    from lowgear.model.model import Model
    from lowgear.platform.placement import kv_bytes_per_token

    spec, device = PRESETS[a.preset], torch.device(a.device)
    batches = [int(b) for b in a.batch.split(",")]
    rows = []
    for kv in a.kv.split(","):
        per_token = kv_bytes_per_token(spec, 2, kv)
        tokens = int(a.cache_gib * 2**30 // per_token) // a.page_size * a.page_size
        config = synthetic_config(spec, a.quant, device, torch.float16 if device.type == "cuda" else torch.float32,
                                  str(device.index or 0) if device.type == "cuda" else "cpu")
        config.attn_backend = a.backend
        model = Model(config)
        cache = Cache(model, max_seq_len=tokens, page_size=a.page_size, kv_dtype=kv)
        model.load_autosplit(cache)
        mods = [*model.layers, model.embed, model.norm] + ([] if model.lm_head is model.embed else [model.lm_head])
        weights = sum(t.numel() * t.element_size() for m in mods for t in (*m.parameters(), *m.buffers()))
        in_16gib = max(0, 16 * 2**30 - weights) // per_token
        print(f"kv={kv}: weights as held {weights / 2**30:.2f} GiB; a 16 GiB card holds {in_16gib} tokens of this cache "
              f"beside them (before activations and the CUDA context)", flush=True)
        gen = None
        if not a.no_prefill:
            gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=_NullTokenizer(spec.vocab_size),
                                      max_batch_size=max(batches))
            gen.warmup()
        for b, context in [(b, int(c)) for c in a.context.split(",") for b in batches]:
            if b * -(-(context + a.steps + 16) // a.page_size) + 1 > tokens // a.page_size:  # + the padding page
                print(f"kv={kv} batch {b}: {b} x {context} tokens do not fit a {tokens}-token cache; skipped", flush=True)
                continue
            out: list = []
            if a.no_prefill:
                s = graphed_step_seconds(model, cache, b, context, a.steps)
            else:
                s = generator_step_seconds(gen, b, context, spec.vocab_size, a.steps, seed=b, tokens_out=out)
            rows.append(dict(kv=kv, batch=b, context=context, ms=s * 1e3, tok_s=b / s, cache_tokens=tokens, tokens_in_16gib=in_16gib,
                             prefilled=not a.no_prefill,
                             bytes_per_token=per_token, first_tokens=[t[:4] for t in out[:2]]))
            print(f"kv={kv:9s} batch {b:3d} ctx {context}: {s * 1e3:7.3f} ms/step {b / s:9.1f} tok/s, "
                  f"cache {tokens} tokens ({per_token} B/token)", flush=True)
        del gen, cache, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = {(r["batch"], r["context"]): r["ms"] for r in rows if r["kv"] == "auto"}
    print(f"\n{'kv':10s}{'batch':>6s}{'context':>8s}{'ms/step':>10s}{'vs auto':>9s}{'cache tokens':>14s}{'in 16 GiB':>11s}")
    for r in rows:
        rel = r["ms"] / base[r["batch"], r["context"]] if (r["batch"], r["context"]) in base else float("nan")
        r["vs_auto"] = rel
        print(f"{r['kv']:10s}{r['batch']:6d}{r['context']:8d}{r['ms']:10.3f}{rel:9.3f}{r['cache_tokens']:14d}"
              f"{r['tokens_in_16gib']:11d}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        with open(os.path.join(a.out, "kv.json"), "w") as f:
            json.dump(dict(device=name, preset=a.preset, quant=a.quant, cache_gib=a.cache_gib, rows=rows), f, indent=1)


def graphed_step_seconds(model, cache, batch: int, context: int, steps: int) -> float:
    """Mean seconds of `steps` CUDA-graph decode steps of `batch` rows at `context` tokens, the rows' pages
    taken from the pool without a prefill (engine/graphs.DecodeGraphs, as the generator replays it)."""
    import time

    from lowgear.cache.pages import pages_needed
    from lowgear.engine.graphs import DecodeGraphs, DecodeRow, kv_bound

    longest = context + steps + 1
    graphs = DecodeGraphs(model, cache, batch, kv_bound(model, cache))  # the generator's bound on a step's context
    assert graphs.scratch.take(), "no page left for the graphs' padding rows"
    per_row = pages_needed(longest, cache.page_size)
    pages = [cache.pool.allocate(per_row) for _ in range(batch)]
    try:
        def rows(i):
            return [DecodeRow(token=3 + r, kv_len=context + 1 + i, pages=pages[r]) for r in range(batch)]

        for i in range(3):
            assert graphs.run(rows(i)) is not None, "the graphed step did not run"
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            graphs.run(rows(i))
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps
    finally:
        graphs.release()
        for p in pages:
            cache.pool.release(p)


if __name__ == "__main__":
    main()
