"""Perplexity of a model with its KV cache in the model dtype, in 8 bits (int8, fp8_e4m3) and in 4 (int4).

The text is the standard library's pydoc topics (lowgear.bench.perplexity.pydoc_text), cut into
windows of --window tokens, each fed in chunks of --chunk tokens so later chunks read the cache's
stored K/V. Prints one line per KV dtype: perplexity and its change against the first one's.
A quantized dtype may name the frame its vectors are stored in (cache/kv.py's kv_scheme) after a
colon: int4:rot+k, fp8_e4m3:none; without one, defaults.KV_SCHEMES gives it.

  PYTHONPATH=src python benchmarks/kv_cache_perplexity.py --tokens 51200 --devices cpu
  PYTHONPATH=src python benchmarks/kv_cache_perplexity.py --tokens 8192 --kv-dtypes auto,int4:none,int4:rot,int4:rot+k
"""

from __future__ import annotations

import argparse
import time

import lowgear as lg
from lowgear.bench.perplexity import perplexity, pydoc_text
from lowgear.cache.kv import SCHEME_PARTS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct Q4_1")
    p.add_argument("--tokens", type=int, default=51200)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--devices", default=None)
    p.add_argument("--attn-backend", default="sdpa")
    p.add_argument("--kv-dtypes", default="auto,int8,fp8_e4m3,int4", help="comma-separated, each dtype[:scheme]")
    args = p.parse_args()
    path = args.model or lg.default_model_path()
    base = None
    for entry in args.kv_dtypes.split(","):
        kv, _, scheme = entry.partition(":")
        config = lg.Config(path)
        config.attn_backend = args.attn_backend
        if args.devices:
            config.devices = args.devices
        if base is None:
            ids = lg.Tokenizer(config).encode_ids(pydoc_text())[: args.tokens]
        model = lg.Model(config)
        cache = lg.Cache(model, max_seq_len=args.window, page_size=256, kv_dtype=kv, kv_scheme=scheme or None)
        model.load_autosplit(cache)
        start = time.time()
        ppl = perplexity(model, cache, ids, window=args.window, chunk=args.chunk)
        base = base or ppl
        if kv != "auto":
            entry = f"{kv}:{'+'.join(sorted(cache.kv_scheme, key=SCHEME_PARTS.index)) or 'none'}"
        print(f"kv {entry:<18} {len(ids)} tokens ({model.dtype}, {model.selections[next(iter(model.selections))].name}): "
              f"perplexity {ppl:.4f} ({100 * (ppl / base - 1):+.3f}%)  [{time.time() - start:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
