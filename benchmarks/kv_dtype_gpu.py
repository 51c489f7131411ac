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
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--cache-gib", type=float, default=8.0)
    ap.add_argument("--page-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--out", default=None)
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
        gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=_NullTokenizer(spec.vocab_size),
                                  max_batch_size=max(batches))
        gen.warmup()
        for b in batches:
            if b * (a.context + a.steps + 16) > tokens:
                print(f"kv={kv} batch {b}: {b} x {a.context} tokens do not fit a {tokens}-token cache; skipped", flush=True)
                continue
            out: list = []
            s = generator_step_seconds(gen, b, a.context, spec.vocab_size, a.steps, seed=b, tokens_out=out)
            rows.append(dict(kv=kv, batch=b, context=a.context, ms=s * 1e3, tok_s=b / s, cache_tokens=tokens,
                             bytes_per_token=per_token, first_tokens=[t[:4] for t in out[:2]]))
            print(f"kv={kv:9s} batch {b:3d} ctx {a.context}: {s * 1e3:7.3f} ms/step {b / s:9.1f} tok/s, "
                  f"cache {tokens} tokens ({per_token} B/token)", flush=True)
        del gen, cache, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = {r["batch"]: r["ms"] for r in rows if r["kv"] == "auto"}
    print(f"\n{'kv':10s}{'batch':>6s}{'ms/step':>10s}{'vs auto':>9s}{'cache tokens':>14s}")
    for r in rows:
        rel = r["ms"] / base[r["batch"]] if r["batch"] in base else float("nan")
        r["vs_auto"] = rel
        print(f"{r['kv']:10s}{r['batch']:6d}{r['ms']:10.3f}{rel:9.3f}{r['cache_tokens']:14d}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        with open(os.path.join(a.out, "kv.json"), "w") as f:
            json.dump(dict(device=name, preset=a.preset, quant=a.quant, cache_gib=a.cache_gib, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
