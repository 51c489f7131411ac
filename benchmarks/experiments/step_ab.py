"""The A/B loop the whole-step benchmark scripts share (pdl_release_ab_gpu.py, gemv_launch_ab_gpu.py).

Configs run interleaved, `rounds` times over, each on a fresh CUDA-graphed DynamicGenerator (so drift
shows as spread between rounds rather than as a difference between configs); per (round, config,
batch) the mean step over `steps` graphed steps, its share of the memory roofline (weight + KV bytes
over `bandwidth`), and whether its greedy tokens equal the first config's (every config must run the
same arithmetic). Prefix reuse is switched off on the cache: a prompt found there would prefill only
its last token, with other rounding than a full prefill, and greedy tokens could differ.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import torch

import lowgear as lg
from lowgear.bench.command import _NullTokenizer, kv_bytes, step_weight_bytes
from lowgear.bench.models import generator_step_seconds


def cache_tokens(batches: Sequence[int], context: int, steps: int, page: int = 256) -> int:
    """Cache tokens for `interleaved_steps`: every batch's prompts and steps in whole pages, and two pages spare."""
    return max(batches) * (-(-(context + steps + 16) // page) + 1) * page + 2 * page


def interleaved_steps(model, cache, spec, configs: Sequence, apply: Callable, batches: Sequence[int], context: int,
                      steps: int, rounds: int, bandwidth: float) -> Iterator[dict]:
    """Yield {round, config, batch, ms, roofline, tokens_equal_first, seconds} (seconds: the config's wall
    time so far in its round, warmup and capture included); `apply(config)` sets a config up."""
    cache.pool.lookup_prefix = lambda keys: []
    tok = _NullTokenizer(spec.vocab_size)
    first: dict[int, list] = {}
    for rnd in range(rounds):
        for cfg in configs:
            apply(cfg)
            t0 = time.perf_counter()
            gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tok, max_batch_size=max(batches))
            gen.warmup()
            for b in batches:
                tokens: list = []
                sec = generator_step_seconds(gen, b, context, spec.vocab_size, steps, tokens_out=tokens)
                roof = (step_weight_bytes(model, b) + kv_bytes(spec, torch.float16, b * context)) / bandwidth
                yield {"round": rnd, "config": cfg, "batch": b, "ms": sec * 1e3, "roofline": roof / sec,
                       "tokens_equal_first": first.setdefault(b, tokens) == tokens,
                       "seconds": time.perf_counter() - t0}
            if gen.graphs is not None:
                gen.graphs.release()
            del gen
