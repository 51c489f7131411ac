"""What constrained neighbours cost free clients: `lowgear serve` under streaming load, with and without
JSON-schema clients beside the free ones, in one run.

    PYTHONPATH=src python benchmarks/server_load.py --free 48 --constrained 16 --tokens 32 --rounds 2 --json out.json

One server (the embedded model unless --model). Each round runs the free clients three ways, all
streaming at once: alone; beside --constrained neighbours that are free too (each asks for
--neighbour-tokens tokens); and beside as many neighbours held to a JSON schema (documents of about
that length). Every free client asks for exactly --tokens tokens (vLLM's `ignore_eos`). Reported: the
free clients' tokens / the slowest free stream's wall time, the best round of each (on a shared
machine the best is the least disturbed), and the ratios. The constrained-vs-free-neighbour ratio is
what a grammar mask costs the others; the alone ratio adds what any 16 more rows cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def start(model: str | None, batch: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lowgear.cli.main", "serve", "--port", str(port), "--allow-any-model", "--max-batch-size", str(batch),
           "--max-seq-len", "512", "--cache-size", str(512 * batch)] + (["--model", model] if model else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(base + "/health", timeout=2):
                return proc, base
        except Exception:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start")


async def client(c, i: int, tokens: int, constrained: bool) -> tuple[bool, int, float]:
    extra = ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}}
             if constrained else {"extra_body": {"ignore_eos": True}})
    t0 = time.perf_counter()
    stream = await c.chat.completions.create(
        model="any", messages=[{"role": "user", "content": f"Describe person number {i}."}],
        max_tokens=64 if constrained else tokens, temperature=0.8, seed=i, stream=True,
        stream_options={"include_usage": True}, **extra)
    n = 0
    async for chunk in stream:
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    return constrained, n, time.perf_counter() - t0


async def phase(base: str, free: int, neighbours: int, tokens: int, constrained: bool = True,
                neighbour_tokens: int = 16) -> dict:
    import openai

    c = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=1800)
    try:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*[client(c, i, tokens, False) for i in range(free)],
                                    *[client(c, free + i, neighbour_tokens, constrained) for i in range(neighbours)])
        wall = time.perf_counter() - t0
    finally:
        await c.close()
    free_runs, others = runs[:free], runs[free:]
    free_tokens = sum(n for _, n, _ in free_runs)
    return {"free": free, "neighbours": neighbours, "constrained": constrained, "free_tokens": free_tokens,
            "wall_s": wall, "free_tokens_per_s": free_tokens / max(t for _, _, t in free_runs),
            "neighbour_tokens": sum(n for _, n, _ in others)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--free", type=int, default=48)
    ap.add_argument("--constrained", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--neighbour-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    proc, base = start(a.model, a.batch)
    try:
        asyncio.run(phase(base, 4, 1, 4))  # warm-up: first requests compile and fill caches
        rounds = []
        for r in range(a.rounds):
            row = {"alone": asyncio.run(phase(base, a.free, 0, a.tokens)),
                   "free_neighbours": asyncio.run(phase(base, a.free, a.constrained, a.tokens, False, a.neighbour_tokens)),
                   "constrained_neighbours": asyncio.run(phase(base, a.free, a.constrained, a.tokens, True,
                                                               a.neighbour_tokens))}
            rounds.append(row)
            print(f"round {r}: free clients " + ", ".join(f"{k} {v['free_tokens_per_s']:.1f} tok/s" for k, v in row.items()),
                  flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    best = {k: max(x[k]["free_tokens_per_s"] for x in rounds) for k in rounds[0]}
    out = {"command": " ".join(sys.argv), "cpu_count": os.cpu_count(), "rounds": rounds, "best_free_tokens_per_s": best,
           "constrained_vs_free_neighbours": best["constrained_neighbours"] / best["free_neighbours"],
           "constrained_vs_alone": best["constrained_neighbours"] / best["alone"]}
    print(f"free clients' tokens/s: alone {best['alone']:.1f}, beside free neighbours {best['free_neighbours']:.1f}, "
          f"beside constrained neighbours {best['constrained_neighbours']:.1f} "
          f"(x{out['constrained_vs_free_neighbours']:.2f} of free neighbours, x{out['constrained_vs_alone']:.2f} of alone)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
