"""lowgear beside Hugging Face transformers (and llama.cpp) on the CPU, on the embedded GGUF, in one run.

Both engines read the same file (transformers: `from_pretrained(dir, gguf_file=...)`, which
dequantizes it to float32), use the same thread count, and decode greedily `--new-tokens` tokens
(no stop token, so every row makes all of them) for batches of 1 and 8 copies of a prompt. The two
engines alternate over `--rounds` rounds and the best round of each is reported (on a shared
machine the best is the least disturbed). Time to first token: one short prompt (the demo's, the same token ids
for both) right after load, prefill + one sampled token, wall clock; plus the load time. With
`--llama-cpp`, llama.cpp through llama-cpp-python (built from source for this CPU) at batch 1 as well,
greedy on the same token ids.

    PYTHONPATH=src python benchmarks/cpu_vs_transformers.py --threads 2 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

PROMPT = "In three sentences, why do older GPUs still matter for running language models?"


def load_lowgear(path: str, cpu_weights: str | None):
    from lowgear import Cache, Config, DynamicGenerator, Model, Tokenizer

    t0 = time.perf_counter()
    config = Config(path)
    config.devices = "cpu"
    if cpu_weights:
        config.cpu_weights = cpu_weights
    model = Model(config)
    cache = Cache(model, max_seq_len=8 * 512, lazy=True)  # 8 jobs of a page each, and room
    model.load_autosplit(cache)
    tok = Tokenizer(config)
    gen = DynamicGenerator(model, cache, tok, max_batch_size=8)
    return gen, tok, time.perf_counter() - t0


def load_hf(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    d, f = os.path.split(os.path.abspath(path))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    return model, tok, time.perf_counter() - t0


def load_llamacpp(path: str, threads: int):
    """llama.cpp through its Python binding (llama-cpp-python, a CPU build from source), if installed."""
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    return llm, None, time.perf_counter() - t0


def llamacpp_run(llm, ids: list[int], batch: int, new_tokens: int) -> tuple[float, list[list[int]]]:
    """Greedy (temperature 0) from a fresh context, batch 1 only (the binding's generate is one sequence)."""
    assert batch == 1
    out: list[int] = []
    t0 = time.perf_counter()
    for tok in llm.generate(list(ids), temp=0.0, top_k=1, reset=True):
        out.append(int(tok))
        if len(out) == new_tokens:
            break
    return time.perf_counter() - t0, [out]


def lowgear_run(gen, ids: list[int], batch: int, new_tokens: int) -> tuple[float, list[list[int]]]:
    from lowgear import DynamicJob, SamplerSettings

    jobs = [DynamicJob(list(ids), max_new_tokens=new_tokens, gen_settings=SamplerSettings.greedy(), stop_conditions=[])
            for _ in range(batch)]
    t0 = time.perf_counter()
    gen.enqueue(jobs)
    while any(not j.finished for j in jobs):
        gen.iterate()
    return time.perf_counter() - t0, [list(j.generated) for j in jobs]


def hf_run(model, ids: list[int], batch: int, new_tokens: int) -> tuple[float, list[list[int]]]:
    x = torch.tensor([ids] * batch)
    t0 = time.perf_counter()
    with torch.inference_mode():
        # no stop token (eos_token_id=None), as lowgear's jobs here: the end-of-text token is an ordinary
        # token. (min_new_tokens would instead forbid it, and change the greedy choice where it wins.)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, eos_token_id=None,
                             do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0, out[:, len(ids):].tolist()


def main() -> None:
    import lowgear

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=lowgear.default_model_path())
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--cpu-weights", default=None, help="lowgear's config.cpu_weights (auto | int4 | unpacked | packed)")
    p.add_argument("--no-hf", action="store_true", help="lowgear alone")
    p.add_argument("--llama-cpp", action="store_true",
                   help="llama.cpp too, through llama-cpp-python (batch 1 only: its generate runs one sequence)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]

    engines = {"lowgear": load_lowgear(args.model, args.cpu_weights)}
    if not args.no_hf:
        engines["transformers"] = load_hf(args.model)
    if args.llama_cpp:
        engines["llama.cpp"] = load_llamacpp(args.model, args.threads)
    runs = {"lowgear": lowgear_run, "transformers": hf_run, "llama.cpp": llamacpp_run}
    results: dict = {name: {"load_s": e[2], "ttft_s": [], "tok_s": {b: [] for b in batches}} for name, e in engines.items()}
    lg_ids = engines["lowgear"][1].encode_ids(PROMPT)
    ids = {name: lg_ids for name in engines}  # the same token ids for every engine
    # time to first token right after load (first call on each engine)
    for name, (eng, _, _) in engines.items():
        run = runs[name]
        dt, _ = run(eng, ids[name], 1, 1)
        results[name]["ttft_s"].append(dt)
        print(f"{name}: loaded in {results[name]['load_s']:.2f} s, first token after load {dt:.3f} s", flush=True)
    tokens: dict = {}
    for r in range(args.rounds):
        for name, (eng, _, _) in engines.items():
            run = runs[name]
            if r > 0:
                dt, _ = run(eng, ids[name], 1, 1)
                results[name]["ttft_s"].append(dt)
            for b in batches:
                if name == "llama.cpp" and b > 1:
                    continue
                dt, toks = run(eng, ids[name], b, args.new_tokens)
                results[name]["tok_s"][b].append(b * args.new_tokens / dt)
                print(f"round {r}: {name} batch {b}: {b * args.new_tokens / dt:.1f} tok/s", flush=True)
                tokens[(name, b)] = toks
    rows = []
    for name, res in results.items():
        best = {b: max(v) if v else float("nan") for b, v in res["tok_s"].items()}
        res["best_tok_s"] = best
        res["ttft_first_s"], res["ttft_best_s"] = res["ttft_s"][0], min(res["ttft_s"])
        rows.append((name, best, res))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}, "
          f"{args.new_tokens} new tokens greedy, best of {args.rounds} interleaved rounds")
    head = " | ".join(f"batch {b} tok/s" for b in batches)
    print(f"| engine | {head} | TTFT first (s) | TTFT best (s) | load (s) |")
    print("|---" * (4 + len(batches)) + "|")
    for name, best, res in rows:
        cells = " | ".join(f"{best[b]:.1f}" for b in batches)
        print(f"| {name} | {cells} | {res['ttft_first_s']:.3f} | {res['ttft_best_s']:.3f} | {res['load_s']:.2f} |")
    if "transformers" in results:
        for b in batches:
            ratio = results["lowgear"]["best_tok_s"][b] / results["transformers"]["best_tok_s"][b]
            same = tokens[("lowgear", b)] == tokens[("transformers", b)]
            print(f"batch {b}: lowgear / transformers = {ratio:.2f}x; greedy tokens identical: {same}")
            results.setdefault("ratio", {})[b] = ratio
            results.setdefault("same_tokens", {})[b] = same
    if "llama.cpp" in results:
        ratio = results["lowgear"]["best_tok_s"][1] / results["llama.cpp"]["best_tok_s"][1]
        same = tokens[("lowgear", 1)] == tokens[("llama.cpp", 1)]
        print(f"batch 1: lowgear / llama.cpp = {ratio:.2f}x; greedy tokens identical: {same}")
        results["ratio_llama_cpp"], results["same_tokens_llama_cpp"] = ratio, same
    if args.json:
        out = {"threads": args.threads, "rounds": args.rounds, "new_tokens": args.new_tokens, "model": args.model,
               "cores": os.cpu_count(), "cpu_weights": args.cpu_weights, "results": results}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
