"""Speculative decoding at batch 1, greedy: decode tokens/s without speculation and with each proposer,
per draft length, on one device.

The target is a random-weight model of `--preset`'s shape (`--quant`, seed 0) fed `--context` random
prompt tokens, or a model file `--model` (`embedded`: the embedded SmolLM2-135M) fed `--prompt`
through its chat template (a paragraph to summarise by default). Modes (`--modes`):

- plain: no speculation (CUDA-graphed decode steps with run-ahead, where the device has them);
- plain-eager: the same without CUDA graphs, the graphs' share of plain decoding (CUDA only);
- perfect: the target model itself as the draft, on a second cache (the model object holds weights
  only; each forward is given its cache): every proposal is accepted, so the row is the ceiling of
  draft speculation and shows what k draft forwards plus a (k+1)-token check cost;
- draft: a smaller model, `--draft-preset` with random weights of seed `--draft-seed` (a bad draft:
  it rarely proposes what the target picks) or the file `--draft-model`;
- ngram: prompt lookup, no draft model.

Each speculating mode runs once per draft length in `--draft-lengths`. After the job's first token
and two more steps (the draft's prefill, first compiles) the rest of its tokens are timed (`--tokens`
or a few more; fewer if the model stops); the best of `--rounds` interleaved rounds is kept.
Reported per row: tokens/s, × against plain, the acceptance rate (accepted / proposed tokens),
tokens and wall ms per target step, and whether the job's tokens equal plain's (greedy speculation
must not change them); on CUDA how many target steps replayed a captured graph (decode steps and
checks of proposals, engine/graphs.py) and how many of a draft model's steps did, on the CPU tokens per
second of the process's CPU time (which other processes on a shared machine disturb less).

    python benchmarks/speculative_gpu.py --preset llama3-8b --quant gptq4 --draft-preset llama3.2-1b \\
        --draft-lengths 2,4,6 --tokens 128 --out $OUT/spec
    python benchmarks/speculative_gpu.py --model embedded --device cpu --modes plain,ngram --rounds 2 --out DIR
    python benchmarks/speculative_gpu.py --preset tiny --draft-preset tiny --device cpu --tokens 32   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

MODES = ("plain", "plain-eager", "perfect", "draft", "ngram")
SUMMARY_PROMPT = (
    "Summarise the following paragraph in three sentences, keeping its key phrases.\n\n"
    "The paged KV cache stores the keys and values of every token in fixed-size pages. A sequence "
    "holds a list of pages, its block table, and a new page is taken from the pool only when the "
    "last one is full. Because pages are the unit of sharing, two requests that start with the same "
    "system prompt can read the same pages, and the pool keeps pages of finished requests as a prefix "
    "cache until their memory is needed. The block table is what the attention kernels read: for each "
    "sequence, the pages that hold its keys and values, in order. The paged KV cache therefore lets "
    "the engine run many sequences of different lengths in one batch without reserving the longest "
    "possible context for each of them."
)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama3-8b", help="the target's shape (random weights, seed 0)")
    ap.add_argument("--quant", default="gptq4", help="the random target's (and draft's) linear layers")
    ap.add_argument("--model", default=None, help="a model file or folder instead of --preset; 'embedded': SmolLM2-135M")
    ap.add_argument("--prompt", default=SUMMARY_PROMPT, help="the prompt with --model (through its chat template)")
    ap.add_argument("--draft-preset", default="llama3.2-1b")
    ap.add_argument("--draft-quant", default=None, help="default: --quant")
    ap.add_argument("--draft-seed", type=int, default=1, help="the random draft's weights (the target's are seed 0)")
    ap.add_argument("--draft-model", default=None, help="a draft model file instead of --draft-preset")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--draft-lengths", default="2,4,6")
    ap.add_argument("--context", type=int, default=512, help="random prompt tokens (random targets)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens timed per run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--page-size", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default=None, help="attention backend (default: triton on CUDA, sdpa on the CPU)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    import lowgear as lg
    from lowgear.bench.models import PRESETS, _NullTokenizer, synthetic_config

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype, label = (torch.float16, str(device.index or 0)) if cuda else (torch.float32, "cpu")
    backend = a.backend or ("triton" if cuda else "sdpa")
    modes = [m for m in a.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"unknown mode(s) {', '.join(unknown)}: choose from {', '.join(MODES)}")
    if "plain" not in modes:
        modes.insert(0, "plain")  # the baseline every row is measured against
    if not cuda and "plain-eager" in modes:
        modes.remove("plain-eager")  # the CPU has no graphs: the same as plain
    lengths = [int(k) for k in a.draft_lengths.split(",")]
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def build(config):
        config.devices, config.attn_backend = [label], backend
        model = lg.Model(config)
        cache = lg.Cache(model, max_seq_len=cache_tokens, page_size=a.page_size)
        model.load_autosplit(cache)
        return model, cache

    def file_config(path):
        return lg.Config(lg.default_model_path() if path == "embedded" else path)

    # the target, its prompt and stop tokens
    if a.model:
        config = file_config(a.model)
        tokenizer = lg.Tokenizer(config)
        text = a.prompt
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": a.prompt}], add_generation_prompt=True)
        prompt = tokenizer.encode_ids(text, encode_special_tokens=True)
        stops = sorted(tokenizer.stop_token_ids)
        name = os.path.basename(lg.default_model_path() if a.model == "embedded" else a.model.rstrip("/"))
    else:
        spec = PRESETS[a.preset]
        config = synthetic_config(spec, a.quant, device, dtype, label)
        tokenizer = _NullTokenizer(spec.vocab_size)
        prompt = torch.randint(3, spec.vocab_size, (a.context,), generator=torch.Generator().manual_seed(0)).tolist()
        stops, name = [], a.preset
    new_tokens = a.tokens + 2 * (max(lengths) + 1) + 1  # the untimed start, then the timed tokens
    # the job's pages and one more: the scratch page graphed steps pad with (decode and check steps share it)
    cache_tokens = (-(-(len(prompt) + new_tokens + max(lengths) + 1) // a.page_size) + 1) * a.page_size
    model, cache = build(config)

    # the drafts: the target itself on a cache of the same size (so its RoPE table serves both), a smaller model
    drafts = {}
    if "perfect" in modes:
        drafts["perfect"] = (model, lg.Cache(model, max_seq_len=cache_tokens, page_size=a.page_size))
    if "draft" in modes:
        if a.draft_model:
            drafts["draft"] = build(file_config(a.draft_model))
        else:
            drafts["draft"] = build(synthetic_config(PRESETS[a.draft_preset], a.draft_quant or a.quant, device, dtype,
                                                     label, seed=a.draft_seed))

    def generator(mode: str, k: int):
        kwargs = dict(max_batch_size=1, cuda_graphs=mode != "plain-eager", num_draft_tokens=k)
        if mode == "ngram":
            kwargs["speculate"] = "ngram"
        elif mode in drafts:
            kwargs["draft_model"], kwargs["draft_cache"] = drafts[mode]
        gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer, **kwargs)
        gen.warmup()
        return gen

    runs = [(m, 0) for m in modes if m.startswith("plain")]
    runs += [(m, k) for m in modes if not m.startswith("plain") for k in lengths]
    gens = {run: generator(*run) for run in runs}
    best: dict = {}
    varied = set()  # runs whose tokens were not the same in every round
    for _ in range(a.rounds):
        for run in runs:
            r = timed(gens[run], prompt, new_tokens, stops, sync)
            if run in best and best[run]["ids"] != r["ids"]:
                varied.add(run)
            if run not in best or r["seconds"] / r["tokens"] < best[run]["seconds"] / best[run]["tokens"]:
                best[run] = r

    rows = report(best, ("plain", 0), varied)
    print(f"\n{name} ({a.quant if not a.model else 'file'}) on {device_name(device)}, batch 1 greedy, "
          f"prompt {len(prompt)} tokens, {backend}")
    print_table(rows, cuda)
    result = dict(device=device_name(device), target=name, quant=None if a.model else a.quant, backend=backend,
                  prompt_tokens=len(prompt), timed_tokens=a.tokens, rounds=a.rounds, threads=torch.get_num_threads(),
                  target_vocab=model.spec.vocab_size, rows=rows)
    if "draft" in drafts:
        result.update(draft=a.draft_model or a.draft_preset, draft_seed=None if a.draft_model else a.draft_seed,
                      draft_vocab=drafts["draft"][0].spec.vocab_size)
    if a.model:
        result["prompt"], result["output"] = a.prompt, tokenizer.decode(best["plain", 0]["ids"])
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "speculative.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


def report(best: dict, baseline, varied: set) -> list[dict]:
    """A row per run from its best round, against the baseline run's (plain) tokens/s and tokens."""
    plain = best[baseline]
    base = plain["tokens"] / plain["seconds"]
    rows = []
    for (mode, k), r in best.items():
        tok_s = r["tokens"] / r["seconds"]
        diverge = next((i for i, (x, y) in enumerate(zip(r["ids"], plain["ids"])) if x != y), None)
        rows.append(dict(
            mode=mode, draft_length=k, tok_s=tok_s, x_plain=tok_s / base,
            acceptance=r["accepted"] / r["proposed"] if r["proposed"] else None,
            tokens_per_step=r["tokens"] / r["steps"], ms_per_step=r["seconds"] / r["steps"] * 1e3,
            tokens=r["tokens"], steps=r["steps"], graphed_steps=r["graphed_steps"], draft_steps=r["draft_steps"],
            draft_graphed_steps=r["draft_graphed_steps"], proposed=r["proposed"],
            accepted=r["accepted"], seconds=r["seconds"], cpu_seconds=r["cpu_seconds"],
            tok_per_cpu_s=r["tokens"] / r["cpu_seconds"], same_as_plain=r["ids"] == plain["ids"],
            first_difference=diverge, same_every_round=(mode, k) not in varied, ids=r["ids"]))
    return rows


def print_table(rows: list[dict], cuda: bool) -> None:
    last = f"{'graphed':>11s}{'draft gr.':>11s}" if cuda else f"{'tok/cpu-s':>11s}"
    print(f"{'mode':12s}{'k':>3s}{'tok/s':>10s}{'x plain':>9s}{'accept':>8s}{'tok/step':>10s}{'ms/step':>9s}"
          f"{last}  same tokens as plain")
    for r in rows:
        accept = f"{r['acceptance']:.3f}" if r["acceptance"] is not None else "-"
        draft = f"{r['draft_graphed_steps']}/{r['draft_steps']}" if r["draft_steps"] else "-"
        graphed = f"{r['graphed_steps']}/{r['steps']}"
        extra = f"{graphed:>11s}{draft:>11s}" if cuda else f"{r['tok_per_cpu_s']:11.1f}"
        same = "yes" if r["same_as_plain"] else f"no (from token {r['first_difference']})"
        print(f"{r['mode']:12s}{r['draft_length']:3d}{r['tok_s']:10.1f}{r['x_plain']:9.3f}{accept:>8s}"
              f"{r['tokens_per_step']:10.2f}{r['ms_per_step']:9.2f}{extra}  {same}")


def timed(gen, prompt: list[int], max_new: int, stops: list[int], sync) -> dict:
    """One greedy job of `max_new` tokens: its first token and two steps untimed, then the rest timed."""
    from lowgear import DynamicJob, SamplerSettings

    job = DynamicJob(list(prompt), max_new_tokens=max_new, gen_settings=SamplerSettings.greedy(), stop_conditions=stops)
    gen.enqueue(job)
    while not job.generated and not job.finished:
        gen.iterate()
    for _ in range(2):
        if not job.finished:
            gen.iterate()
    sync()
    n0, proposed0, accepted0, graphed0 = len(job.generated), gen.spec_proposed, gen.spec_accepted, gen.graphed_steps
    draft0 = draft_steps(gen)
    steps0 = gen.steps - (gen._ahead is not None)  # a step run ahead, launched already, makes a timed token
    t0, c0 = time.perf_counter(), time.process_time()
    while not job.finished:
        gen.iterate()
    sync()
    if len(job.generated) == n0:
        raise SystemExit("the model stopped before the timed part: give a prompt with a longer answer")
    return dict(tokens=len(job.generated) - n0, seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                steps=gen.steps - steps0, graphed_steps=gen.graphed_steps - graphed0,
                draft_steps=draft_steps(gen)[0] - draft0[0], draft_graphed_steps=draft_steps(gen)[1] - draft0[1],
                proposed=gen.spec_proposed - proposed0, accepted=gen.spec_accepted - accepted0, ids=list(job.generated))


def draft_steps(gen) -> tuple[int, int]:
    """A draft model's forwards so far, and of those the ones replayed from its graphs ((0, 0) without one)."""
    return getattr(gen.proposer, "steps", 0), getattr(gen.proposer, "graphed_steps", 0)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    main()
