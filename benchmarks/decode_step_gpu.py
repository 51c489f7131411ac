"""Decode step time with and without CUDA graphs, on a random-weight model built as `lowgear bench` does.

    python benchmarks/decode_step_gpu.py [--preset llama3-8b] [--quant float,q4_0] [--batches 1,8,32] [--context 512]

Per (quant, batch): the model's forward alone (eager, CUDA events, median) against the captured
graph's replay, then whole generator steps (`iterate()`: metadata, forward, sampling) with graphs off
and on, in tokens/s. Each line ends with the step's memory roofline (weight bytes + KV bytes over a
measured copy bandwidth) and the graph replay's share of it.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

import lowgear as lg
from lowgear.attention.metadata import build_metadata
from lowgear.bench.command import (
    PRESETS,
    Timer,
    _NullTokenizer,
    kv_bytes,
    measure_bandwidth,
    step_weight_bytes,
)
from lowgear.bench.models import generator_step_seconds, synthetic_model
from lowgear.engine.graphs import DecodeRow


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--quant", default="float,q4_0")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    spec = PRESETS[a.preset]
    dev = torch.device("cuda:0")
    batches = [int(b) for b in a.batches.split(",")]
    timer = Timer(dev)
    bandwidth = measure_bandwidth(timer, quick=False)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    page = 256
    cache_tokens = max(batches) * (-(-(a.context + a.steps + 16) // page) + 1) * page + 2 * page
    for quant in a.quant.split(","):
        t0 = time.perf_counter()
        model, cache = synthetic_model(spec, quant, dev, cache_tokens, page)
        print(f"{spec.name} {quant}: loaded in {time.perf_counter() - t0:.1f} s, cache {cache_tokens} tokens, "
              f"backend {model.selections['cuda:0'].backend.name}", flush=True)
        tok = _NullTokenizer(spec.vocab_size)
        eager_gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tok, max_batch_size=max(batches), cuda_graphs=False)
        graph_gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tok, max_batch_size=max(batches))
        assert graph_gen.graphs is not None, graph_gen.graphs_off_reason
        t0 = time.perf_counter()
        graph_gen.warmup()
        print(f"  warmup + capture of buckets {graph_gen.graphs.buckets}: {time.perf_counter() - t0:.1f} s", flush=True)
        graphs = graph_gen.graphs
        for b in batches:
            per_seq = -(-(a.context + 1) // page)
            pages = cache.pool.allocate(b * per_seq)
            tables = [pages[s * per_seq : (s + 1) * per_seq] for s in range(b)]
            meta = build_metadata([1] * b, [a.context + 1] * b, tables, page, device=dev)
            ids = torch.randint(0, spec.vocab_size, (b,), device=dev)
            eager = timer.median(lambda: model.forward(ids, meta, cache), 3, 20)
            rows = [DecodeRow(5, a.context + 1, t) for t in tables]
            graphs.run(rows)
            replay = timer.median(lambda: graphs.run(rows), 3, 20)
            cache.pool.release(pages)
            roof = (step_weight_bytes(model, b) + kv_bytes(spec, torch.float16, b * (a.context + 1))) / bandwidth
            ge = generator_step_seconds(eager_gen, b, a.context, spec.vocab_size, a.steps)
            gg = generator_step_seconds(graph_gen, b, a.context, spec.vocab_size, a.steps)
            print(f"  bs {b:3d} ctx {a.context}: forward eager {eager * 1e3:7.2f} ms ({b / eager:8.1f} tok/s)  "
                  f"graph {replay * 1e3:7.2f} ms ({b / replay:8.1f} tok/s)  x{eager / replay:.2f} | "
                  f"generator step eager {ge * 1e3:7.2f} ms ({b / ge:8.1f} tok/s)  graph {gg * 1e3:7.2f} ms "
                  f"({b / gg:8.1f} tok/s)  x{ge / gg:.2f} | roofline {roof * 1e3:6.2f} ms, graph at "
                  f"{100 * roof / replay:3.0f}%", flush=True)
        graphs.release()
        del model, cache, eager_gen, graph_gen, graphs
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
