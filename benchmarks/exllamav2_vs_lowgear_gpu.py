"""lowgear beside ExLlamaV2 on one 8B-shape GPTQ 4-bit folder, both with flash-attn off (the no-flash-attn setting).

    python benchmarks/exllamav2_vs_lowgear_gpu.py --out OUT_DIR [--batches 1,16] [--context 512] [--steps 64]

Writes a Llama-3-8B-shape GPTQ folder (4-bit, group 128, symmetric, no act-order, checkpoint_format
"gptq"; random codes and scales; float16 embeddings and head), then, one after the other on the same GPU:

- ExLlamaV2 0.3.2 (`config.no_flash_attn = True`, its defaults otherwise): a batch of B prompts of
  `context` tokens prefilled into an ExLlamaV2Cache(batch_size=B), then `steps` single-token forwards
  of the whole batch; tokens/s = B / median forward time. This times ExLlamaV2's forward alone (no
  sampling), which favours it.
- lowgear, with its own choices (the ladder's rung for prefill, a capturable rung and CUDA graphs
  for decode): DynamicGenerator with B greedy jobs of the same length, timed per whole generator
  step (metadata, forward, sampling): the mean over `steps` consecutive iterate() calls, as a caller
  streaming tokens sees it (the generator runs a known next step ahead, so a sync between calls would
  misplace that step's time; bench_models.generator_step_seconds).

With `--exllamav2-generator`, generator against generator as users run them:

- ExLlamaV2's DynamicGenerator with ExLlamaV2's no-flash-attn recipe (`paged=False, max_batch_size=1`), one greedy
  job: the mean step over `steps` iterate() calls, as above, and a cProfile of as many more (where
  its host time goes); then a second job over the same key lengths (what a process that has served
  those lengths before gets). Twice: with torch's sdpa backends as they come, and with its cuDNN
  attention off. lowgear's generator step is the one above, with the folder's tokenizer.
- `--queued N` (default 16): N requests of `context` prompt tokens and `--new` tokens each, queued
  at once; the wall time until the last one finishes, prefill included. ExLlamaV2's no-flash-attn recipe serves
  them one after another; lowgear batches them.

The folder's tokenizer is a synthetic byte-level BPE of the model's whole vocabulary (128000
ordinary tokens, 256 special; `lowgear.bench.synthetic.byte_vocab`), so both generators detokenize what
they stream as they would a real model's. Memory is torch's peak allocation during each
framework's run, weights and cache included. Needs exllamav2 importable (it builds its CUDA
extension on first import) and lowgear on the path. ExLlamaV2's batch-1 step is bound by the host
CPU (Python and launches per layer), so the log names the CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
from safetensors.torch import save_file

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 4096, 32, 32, 8, 14336, 128256
ORDINARY = 128000  # the tokenizer's non-special tokens; prompts are drawn from them
GROUP = 128


def log(*a):
    print(*a, flush=True)


def host_cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        name = "?"
    return f"{name}, {os.cpu_count()} cores"


def write_gptq_8b(folder: str) -> float:
    """Random 4-bit GPTQ folder of the Llama-3-8B shape; returns the seconds it took."""
    t0 = time.time()
    os.makedirs(folder, exist_ok=True)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    def linear(prefix: str, out_f: int, in_f: int) -> dict:
        qweight = torch.randint(-(2**31), 2**31 - 1, (in_f // 8, out_f), generator=g, device=dev, dtype=torch.int32)
        qzeros = torch.full((in_f // GROUP, out_f // 8), 0x77777777, dtype=torch.int32, device=dev)  # zero 8, stored 7
        scales = (torch.rand(in_f // GROUP, out_f, generator=g, device=dev) * 0.002 + 0.001).half()
        g_idx = (torch.arange(in_f, device=dev) // GROUP).int()
        return {f"{prefix}.qweight": qweight.cpu(), f"{prefix}.qzeros": qzeros.cpu(), f"{prefix}.scales": scales.cpu(),
                f"{prefix}.g_idx": g_idx.cpu()}

    shards, index = [], {}
    t = {"model.embed_tokens.weight": (torch.randn(VOCAB, HIDDEN, generator=g, device=dev) * 0.02).half().cpu(),
         "model.norm.weight": torch.ones(HIDDEN, dtype=torch.float16),
         "lm_head.weight": (torch.randn(VOCAB, HIDDEN, generator=g, device=dev) * 0.02).half().cpu()}
    shards.append(t)
    hd = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.float16),
             p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.float16)}
        t |= linear(p + "self_attn.q_proj", HEADS * hd, HIDDEN)
        t |= linear(p + "self_attn.k_proj", KV_HEADS * hd, HIDDEN)
        t |= linear(p + "self_attn.v_proj", KV_HEADS * hd, HIDDEN)
        t |= linear(p + "self_attn.o_proj", HIDDEN, HEADS * hd)
        t |= linear(p + "mlp.gate_proj", FFN, HIDDEN)
        t |= linear(p + "mlp.up_proj", FFN, HIDDEN)
        t |= linear(p + "mlp.down_proj", HIDDEN, FFN)
        shards.append(t)
    # 4 files: 33 pieces grouped
    groups = [shards[i::4] for i in range(4)]
    for n, grp in enumerate(groups):
        name = f"model-{n + 1:05d}-of-00004.safetensors"
        merged = {k: v for d in grp for k, v in d.items()}
        save_file(merged, os.path.join(folder, name), metadata={"format": "pt"})
        index.update({k: name for k in merged})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    from lowgear.bench.synthetic import byte_vocab, write_hf_tokenizer

    vocab = byte_vocab(VOCAB, regular=ORDINARY)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 8192,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
              "torch_dtype": "float16", "bos_token_id": vocab.bos_id, "eos_token_id": vocab.eos_id,
              "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False,
                                      "sym": True, "checkpoint_format": "gptq"}}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    write_hf_tokenizer(folder, vocab)
    return time.time() - t0


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def exllamav2_step(folder: str, b: int, context: int, steps: int) -> dict:
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

    from lowgear.bench.command import Timer

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    config = ExLlamaV2Config(folder)
    config.no_flash_attn = True  # the no-flash-attn setting
    config.max_seq_len = context + steps + 16
    config.max_batch_size = b
    config.max_input_len = min(2048, context)
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, batch_size=b, max_seq_len=context + steps + 16, lazy=True)
    model.load_autosplit(cache, progress=False)
    load_s = time.time() - t0
    ids = torch.randint(0, ORDINARY, (b, context))
    model.forward(ids[:, :-1], cache, preprocess_only=True)
    base = cache.current_seq_len
    tok = ids[:, -1:]

    def step():
        model.forward(tok, cache)
        cache.current_seq_len = base  # every timed step at the same context

    sec = Timer(torch.device("cuda")).median(step, 3, steps)
    res = {"step_ms": sec * 1e3, "tok_s": b / sec, "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "load_s": load_s}
    model.unload()
    return res


def time_queued(gen, jobs: list, new: int, pending) -> dict:
    """Enqueue `jobs` (`new` tokens each) on either framework's generator at once and iterate while
    `pending()`: the wall time until the last is done, prefill included."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    gen.enqueue(jobs)
    while pending():
        gen.iterate()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"jobs": len(jobs), "new": new, "wall_s": wall, "tok_s": len(jobs) * new / wall}


def exllamav2_generator(folder: str, context: int, steps: int, queued: int, new: int, cudnn_sdp: bool) -> dict:
    """ExLlamaV2's own DynamicGenerator with ExLlamaV2's no-flash-attn recipe (no_flash_attn, paged=False,
    max_batch_size=1). One greedy job: the mean over `steps` consecutive iterate() calls once its
    prompt is in, as a caller streaming tokens sees it, then a cProfile of `steps` more (top
    functions by own time). Then `queued` jobs enqueued at once, timed until the last finishes.

    `cudnn_sdp` False switches off torch's cuDNN attention (torch.backends.cuda.enable_cudnn_sdp)
    for the run: without flash-attn, ExLlamaV2 attends through torch's sdpa, and where torch picks
    cuDNN (Hopper) each new key length builds a new cuDNN graph, so every decode step pays for one."""
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)
    try:
        return _exllamav2_generator(folder, context, steps, queued, new)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def _exllamav2_generator(folder: str, context: int, steps: int, queued: int, new: int) -> dict:
    import cProfile
    import pstats

    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    torch.cuda.empty_cache()
    config = ExLlamaV2Config(folder)
    config.no_flash_attn = True
    config.max_seq_len = -(-(context + 3 * steps + new + 64) // 256) * 256  # its cache wants whole 256-token pages
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=config.max_seq_len, lazy=True)
    model.load_autosplit(cache, progress=False)
    tokenizer = ExLlamaV2Tokenizer(config)
    gen = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer, paged=False, max_batch_size=1)
    g = torch.Generator().manual_seed(1)

    def start_and_time(max_new: int):
        """A fresh greedy job of `context` prompt tokens: its prompt and 8 steps, then `steps` timed steps."""
        job = ExLlamaV2DynamicJob(input_ids=torch.randint(0, ORDINARY, (1, context), generator=g), max_new_tokens=max_new,
                                  gen_settings=ExLlamaV2Sampler.Settings.greedy(), stop_conditions=[])
        gen.enqueue(job)
        for _ in range(8):  # the prompt, then a few decode steps
            gen.iterate()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            gen.iterate()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps, job

    sec, job = start_and_time(2 * steps + 16)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        gen.iterate()
    torch.cuda.synchronize()
    prof.disable()
    gen.cancel(job)
    # a second job over the same key lengths: what a process that has served them before gets
    sec_seen, job = start_and_time(steps + 16)
    gen.cancel(job)
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:14]  # (file, line, fn) -> (cc, nc, tt, ct, ...)
    profile = [f"{tt / steps * 1e3:7.3f} ms own {ct / steps * 1e3:7.3f} ms total  x{nc / steps:6.1f}  "
               f"{os.path.basename(fn[0])}:{fn[1]} {fn[2]}" for fn, (cc, nc, tt, ct, _) in rows]
    res = {"step_ms": sec * 1e3, "tok_s": 1 / sec, "step_ms_seen": sec_seen * 1e3, "tok_s_seen": 1 / sec_seen,
           "profile_per_step": profile}
    if queued:
        jobs = [ExLlamaV2DynamicJob(input_ids=torch.randint(0, ORDINARY, (1, context), generator=g), max_new_tokens=new,
                                    gen_settings=ExLlamaV2Sampler.Settings.greedy(), stop_conditions=[])
                for _ in range(queued)]
        res["queued"] = time_queued(gen, jobs, new, gen.num_remaining_jobs)
    model.unload()
    return res


def run_exllamav2(folder: str, batches: list[int], context: int, steps: int) -> dict:
    res = {}
    for b in batches:
        res[b] = r = exllamav2_step(folder, b, context, steps)
        gc.collect()
        log(f"  ExLlamaV2 bs {b:3d} ctx {context}: {r['step_ms']:7.2f} ms/step  {r['tok_s']:8.1f} tok/s  "
            f"peak {r['peak_gib']:.2f} GiB (load {r['load_s']:.1f} s)")
    return res


def run_lowgear(folder: str, batches: list[int], context: int, steps: int, backend: str | None,
                profile: bool = False, queued: int = 0, new: int = 32) -> dict:
    import lowgear as lg
    from lowgear.bench.models import generator_step_seconds

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    config = lg.Config(folder)
    config.no_flash_attn = True
    config.dtype = "float16"
    if backend:
        config.attn_backend = backend
    model = lg.Model(config)
    page = 256
    cache_tokens = max(max(batches), queued) * (-(-(context + steps + new + 16) // page) + 1) * page
    cache = lg.Cache(model, max_seq_len=cache_tokens, page_size=page)
    model.load_autosplit(cache)
    load_s = time.time() - t0
    chosen = model.selections["cuda:0"].backend.name
    gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=lg.Tokenizer(config),
                              max_batch_size=max(max(batches), queued))
    gen.warmup()
    res = {"backend": chosen, "graphs": gen.graphs is not None, "load_s": load_s}
    for b in batches:
        sec = generator_step_seconds(gen, b, context, ORDINARY, steps)
        res[b] = {"step_ms": sec * 1e3, "tok_s": b / sec}
        if profile and b == batches[0]:
            gen.enqueue(jobs := [lg.DynamicJob(input_ids=list(range(3, 3 + context)), max_new_tokens=8,
                                               gen_settings=lg.Sampler.Settings.greedy())])
            while not jobs[0].generated:
                gen.iterate()
            from profile_decode_gpu import kernel_table, print_table  # benchmarks/, beside this file

            agg, total = kernel_table(gen.iterate, 3)
            gen.cancel(jobs[0])
            gen.iterate()
            print_table(f"lowgear bs {b} step, CUDA kernels (torch.profiler)", agg, total, sec * 1e6, 16)
        log(f"  lowgear ({chosen}{', graphs' if res['graphs'] else ''}) bs {b:3d} ctx {context}: {sec * 1e3:7.2f} ms/step  "
            f"{b / sec:8.1f} tok/s")
    if queued:
        g = torch.Generator().manual_seed(2)
        jobs = [lg.DynamicJob(input_ids=torch.randint(0, ORDINARY, (context,), generator=g).tolist(), max_new_tokens=new,
                              gen_settings=lg.Sampler.Settings.greedy()) for _ in range(queued)]
        q = res["queued"] = time_queued(gen, jobs, new, lambda: any(not j.finished for j in jobs))
        log(f"  lowgear {queued} queued requests ({context} + {new} tokens each): {q['wall_s']:.2f} s, {q['tok_s']:.1f} tok/s")
    res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    log(f"  lowgear peak {res['peak_gib']:.2f} GiB (load {load_s:.1f} s, cache {cache_tokens} tokens)")
    if gen.graphs is not None:
        gen.graphs.release()
    del gen, model, cache
    gc.collect()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--folder", default="/tmp/llama3-8b-gptq4")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="profile 3 steps of lowgear's run")
    ap.add_argument("--forced-triton", action="store_true", help="also run lowgear with attn_backend='triton'")
    ap.add_argument("--exllamav2-generator", action="store_true",
                    help="also time ExLlamaV2's DynamicGenerator with ExLlamaV2's no-flash-attn recipe (batch 1, and --queued requests)")
    ap.add_argument("--queued", type=int, default=16, help="requests queued at once for the generator comparison (0: none)")
    ap.add_argument("--new", type=int, default=32, help="tokens each queued request generates")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    batches = [int(b) for b in a.batches.split(",")]
    log(f"GPU {torch.cuda.get_device_name(0)}; torch {torch.__version__}; host CPU {host_cpu()}")
    if not os.path.exists(os.path.join(a.folder, "config.json")):
        log(f"writing Llama-3-8B-shape GPTQ 4-bit g{GROUP} folder: {write_gptq_8b(a.folder):.0f} s")
    size = folder_bytes(a.folder)
    log(f"folder {a.folder}: {size / 1e9:.2f} GB of safetensors")
    queued = a.queued if a.exllamav2_generator else 0
    result = {"gpu": torch.cuda.get_device_name(0), "host_cpu": host_cpu(), "context": a.context, "steps": a.steps, "folder_bytes": size,
              "shape": "Llama-3-8B (hidden 4096, 32 layers, 32/8 heads, ffn 14336, vocab 128256)",
              "quant": f"GPTQ 4-bit g{GROUP} sym, no act-order"}
    import exllamav2

    result["exllamav2_version"] = exllamav2.__version__
    result["exllamav2"] = run_exllamav2(a.folder, batches, a.context, a.steps)
    gc.collect()
    if a.exllamav2_generator:
        for cudnn_sdp in (True, False):
            key = "exllamav2_generator" + ("" if cudnn_sdp else "_no_cudnn")
            what = "torch's sdpa backends as they come" if cudnn_sdp else "torch's cuDNN attention off"
            try:
                r = result[key] = exllamav2_generator(a.folder, a.context, a.steps, queued, a.new, cudnn_sdp)
            except Exception as e:  # a reference that cannot run is reported, the rest still runs
                result[key] = {"error": repr(e)}
                log(f"  ExLlamaV2 DynamicGenerator ({what}): failed: {e!r}")
                continue
            log(f"  ExLlamaV2 DynamicGenerator (paged=False, max_batch_size=1; {what}) ctx {a.context}: "
                f"{r['step_ms']:7.2f} ms/step  {r['tok_s']:8.1f} tok/s; a second job over the same lengths "
                f"{r['step_ms_seen']:7.2f} ms/step  {r['tok_s_seen']:8.1f} tok/s; the first under cProfile, per step:")
            for line in r["profile_per_step"]:
                log(f"      {line}")
            if "queued" in r:
                q = r["queued"]
                log(f"  ExLlamaV2 {q['jobs']} queued requests ({a.context} + {q['new']} tokens each): "
                    f"{q['wall_s']:.2f} s, {q['tok_s']:.1f} tok/s")
            gc.collect()
    torch.cuda.empty_cache()
    result["lowgear_default"] = run_lowgear(a.folder, batches, a.context, a.steps, None, profile=a.profile,
                                            queued=queued, new=a.new)
    if a.forced_triton:
        result["lowgear_triton"] = run_lowgear(a.folder, batches, a.context, a.steps, "triton")
    log("\nbatch | ExLlamaV2 tok/s, peak GiB | lowgear tok/s (its own choices), peak GiB | lowgear / ExLlamaV2")
    for b in batches:
        e, ld = result["exllamav2"][b], result["lowgear_default"][b]
        log(f"{b:5d} | {e['tok_s']:10.1f}, {e['peak_gib']:.2f} | {ld['tok_s']:10.1f}, {result['lowgear_default']['peak_gib']:.2f} "
            f"| {ld['tok_s'] / e['tok_s']:5.2f}x")
    lg1 = result["lowgear_default"].get(1) or result["lowgear_default"][batches[0]]
    lq = result["lowgear_default"].get("queued")
    for key, what in (("exllamav2_generator", "as they come"), ("exllamav2_generator_no_cudnn", "cuDNN attention off")):
        eg = result.get(key, {})
        if "tok_s" not in eg:
            continue
        log(f"generator against generator, batch 1 (ExLlamaV2 {what}): ExLlamaV2 {eg['tok_s']:.1f} tok/s "
            f"({eg['tok_s_seen']:.1f} over lengths it has seen), lowgear {lg1['tok_s']:.1f} tok/s | "
            f"{lg1['tok_s'] / eg['tok_s']:5.2f}x ({lg1['tok_s'] / eg['tok_s_seen']:5.2f}x)")
        if "queued" in eg and lq:
            log(f"  {lq['jobs']} queued requests, until the last is done: ExLlamaV2 (no-flash-attn recipe) "
                f"{eg['queued']['wall_s']:.2f} s, lowgear {lq['wall_s']:.2f} s | {eg['queued']['wall_s'] / lq['wall_s']:5.2f}x")
    with open(os.path.join(a.out, "exllamav2_vs_lowgear.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
