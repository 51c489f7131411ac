"""Two or more source trees of lowgear, A/B'd on one GPU: graphed decode steps, interleaved, same greedy tokens.

Each tree runs in a worker process of its own (two versions of a package can't share one process),
loaded once per weight format; the driver asks the workers in turn, alternating which goes first
each round, to time `steps` CUDA-graphed DynamicGenerator decode steps per batch size. Every timing
uses prompts drawn from a seed the two workers share and neither has seen before (so no prefix
reuse), and the driver checks that every tree produced the same greedy tokens as the first.

    python benchmarks/ab_trees_gpu.py --tree before=/tmp/before/src --tree after=src \
        --quants float,gptq4 --batch 1,16 --context 512 --rounds 5 --out $OUT/ab

Prints a table (median ms per step of each tree, and each over the first) and writes ab.json under --out
after every weight format (a run cut short keeps the formats it finished).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def _import_bench(src: str):
    """The tree's synthetic model builder, step timer and presets, wherever that tree keeps them."""
    sys.path.insert(0, src)
    import lowgear  # noqa: F401

    try:
        from lowgear.bench import models as bm
        from lowgear.bench.command import PRESETS, _NullTokenizer
    except ImportError:  # the layout before bench/ became a package
        import lowgear.bench_models as bm
        from lowgear.bench import PRESETS, _NullTokenizer
    return bm, PRESETS, _NullTokenizer


def worker(src: str) -> None:
    import torch

    bm, presets, null_tokenizer = _import_bench(src)
    import lowgear as lg

    out = sys.stdout
    sys.stdout = sys.stderr  # keep the protocol channel clean of library prints
    state: dict = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "load":
            state.clear()
            torch.cuda.empty_cache()
            spec = presets[cmd["preset"]]
            model, cache = bm.synthetic_model(spec, cmd["quant"], torch.device("cuda", 0), cmd["cache_tokens"], 256)
            gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=null_tokenizer(spec.vocab_size),
                                      max_batch_size=cmd["max_batch"])
            gen.warmup()
            state.update(model=model, cache=cache, gen=gen, spec=spec)
            reply = {"ok": True, "lowgear": lg.__file__, "graphs": gen.graphs is not None}
        elif cmd["op"] == "time":
            tokens: list = []
            sec = bm.generator_step_seconds(state["gen"], cmd["batch"], cmd["context"], state["spec"].vocab_size,
                                            cmd["steps"], seed=cmd["seed"], tokens_out=tokens)
            reply = {"ms": sec * 1e3, "tokens": tokens}
        else:
            reply = {"ok": True}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class Worker:
    def __init__(self, name: str, src: str):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", os.path.abspath(src)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.name} died (see its stderr above)")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.send(**cmd)
        return self.reply()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--tree", action="append", default=[], help="NAME=SRC_DIR (two or more; the first is the base)")
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--quants", default="float,gptq4")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker)
    trees = [t.split("=", 1) for t in a.tree]
    if len(trees) < 2:
        raise SystemExit("give two or more --tree NAME=SRC")
    batches = [int(b) for b in a.batch.split(",")]
    page = 256
    # a sequence's prompt, its timed steps and the tokens it may make while the others prefill, and a page spare;
    # no more: every tree's worker holds its own cache on the one GPU (four 8B workers at batch 64 fit 80 GB)
    cache_tokens = max(batches) * (-(-(a.context + a.steps + 16) // page) + 1) * page
    rows, done = [], []
    for quant in a.quants.split(","):
        workers = [Worker(n, s) for n, s in trees]
        for w in workers:  # all load at once (the random weights are made on the host); timings stay one at a time
            w.send(op="load", preset=a.preset, quant=quant, cache_tokens=cache_tokens, max_batch=max(batches))
        for w in workers:
            print(f"[{quant}] {w.name}: {w.reply()}", flush=True)
        for rnd in range(a.rounds):
            order = workers if rnd % 2 == 0 else workers[::-1]
            for b in batches:
                seed = 1000 * (rnd + 1) + b
                got = {w.name: w.ask(op="time", batch=b, context=a.context, steps=a.steps, seed=seed) for w in order}
                same = all(got[n]["tokens"] == got[trees[0][0]]["tokens"] for n, _ in trees)
                for name, r in got.items():
                    rows.append({"quant": quant, "batch": b, "round": rnd, "tree": name, "ms": r["ms"],
                                 "tokens_equal": same})
                print(f"[{quant}] round {rnd} batch {b}: " +
                      ", ".join(f"{n} {r['ms']:.3f} ms" for n, r in got.items()) + f", tokens equal: {same}",
                      flush=True)
        for w in workers:
            w.proc.stdin.close()
            w.proc.wait()
        done.append(quant)
        summary = summarize(rows, trees, done, batches)
        if a.out:  # after every weight format: a run cut short keeps the formats it finished
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, "ab.json"), "w") as f:
                json.dump({"args": vars(a), "rows": rows, "summary": summary}, f, indent=1)
    print(f"\n{'quant':8} {'batch':>5} " + " ".join(f"{n:>12}" for n, _ in trees) +
          "".join(f" {n + '/' + trees[0][0]:>14}" for n, _ in trees[1:]) + "  tokens")
    for r in summary:
        print(f"{r['quant']:8} {r['batch']:>5} " + " ".join(f"{r['median_ms'][n]:>12.3f}" for n, _ in trees) +
              "".join(f" {v:>14.3f}" for v in r["ratios"].values()) + f"  {r['tokens_equal']}")


def summarize(rows: list[dict], trees: list, quants: list[str], batches: list[int]) -> list[dict]:
    """Per weight format and batch: each tree's median ms, each over the first tree's, tokens all equal."""
    summary = []
    for quant in quants:
        for b in batches:
            med = {n: statistics.median(r["ms"] for r in rows if r["quant"] == quant and r["batch"] == b
                                        and r["tree"] == n) for n, _ in trees}
            equal = all(r["tokens_equal"] for r in rows if r["quant"] == quant and r["batch"] == b)
            ratios = {n: med[n] / med[trees[0][0]] for n, _ in trees[1:]}  # each tree's time over the base's
            summary.append({"quant": quant, "batch": b, "median_ms": med, "ratio": ratios[trees[1][0]],
                            "ratios": ratios, "tokens_equal": equal})
    return summary

if __name__ == "__main__":
    main()
