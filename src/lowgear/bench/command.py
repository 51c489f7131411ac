"""`lowgear bench`: how close lowgear runs to the hardware, beside transformers, in one run.

It builds models of real shapes (Llama-3-8B, Llama-3.2-1B, Qwen2-0.5B; float16, Q4_0-packed or GPTQ 4-bit) from
an in-memory source of random tensors (`RandomSource`, generated directly on the device: no file,
no download), or loads `--model`. For each attention rung (every rung that works on the device,
plus a forced "what a T4/V100 gets" rung) it times the model's decode step at fixed batch sizes
and contexts, a prefill, and the generator end to end (time to first token). Each figure sits
beside its ceiling, measured in the same run: decode against the memory roofline (bytes a step
must read ÷ copy bandwidth), prefill against a large matmul's FLOP/s; and beside transformers on
the same shapes (bench/peer.py). Which models and rungs run: bench/variants.py. Results go to bench.json
and bench.png (see benchmarks/README.md).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import sys
import time
from contextlib import nullcontext

import torch

from ..errors import LowgearError, install_hint, require
from .measure import (Timer, _free_bytes, _memory, _reset_peak, kv_bytes, measure_bandwidth, measure_matmul,
                      prefill_flops, source_bytes, step_weight_bytes)
from .models import DEFAULT_QUANTS, PRESETS, QUANTS, RandomSource, _NullTokenizer, synthetic_config
from .report import (_describe, _dt, _flops, _fmt_bytes, _ints, _line, _names, _pages, _spec_dict, plot, summary,
                     write_outputs)
from ..formats.spec import ModelSpec
from .variants import T4_RUNG, Variant, _what, plan_variants

GiB = 2**30


# ---------------------------------------------------------------- the run
class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.label = "cpu" if self.device.type == "cpu" else str(self.device.index)
        if self.device.type == "cpu" and (args.threads or args.quick):
            # Tiny shapes on a busy CPU: a thread pool costs more than it gives (and timings become noise).
            torch.set_num_threads(args.threads or 1)
        self.timer = Timer(self.device)
        quick, cpu = args.quick, self.device.type == "cpu"
        self.batches = _ints(args.batch) or ([1, 4] if quick and cpu else [1, 8, 32, 64])
        self.contexts = _ints(args.context) or ([64, 256] if quick and cpu else [512, 4096])
        self.prefill = args.prefill or (128 if quick and cpu else 2048)
        self.new_tokens = 8 if quick else 32
        self.warmup, self.iters = (1, 3) if quick else (args.warmup, args.iters)
        self.results: list[dict] = []
        self.skipped: list[dict] = []
        self.rung_log: list[dict] = []
        self.models: list[dict] = []
        self.done, self.total = 0, 0
        self._since = time.perf_counter()  # when the last figure (or model load) ended: each figure's wall time

    # ------------------------------------------------------------ bookkeeping
    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def tick(self, text: str) -> None:
        self.done += 1
        self.say(f"[{self.done}/{self.total}] {text}")

    def device_facts(self) -> dict:
        from .. import __version__

        facts = {"device": str(self.device), "name": platform.processor() or "CPU", "torch": torch.__version__,
                 "lowgear": __version__, "python": platform.python_version()}
        if self.device.type == "cuda":
            p = torch.cuda.get_device_properties(self.device)
            facts.update(name=p.name, compute_capability=f"{p.major}.{p.minor}", total_memory_bytes=p.total_memory,
                         sm_count=p.multi_processor_count, cuda=torch.version.cuda)
        return facts

    def skip(self, what: dict, reason: str) -> None:
        self.skipped.append({**what, "reason": reason})
        self.say(f"  skipped {_describe(what)}: {reason}")

    def shapes_that_fit(self, v: Variant, weight_bytes: int) -> tuple[list[tuple[int, int]], int]:
        """(batch, context) pairs whose cache fits beside the weights, and the cache size in tokens."""
        page = self.args.page_size
        free = _free_bytes(self.device)
        budget = None if free is None else free - weight_bytes - int(self.args.headroom_gib * GiB)
        fit, tokens = [], _pages(self.prefill + self.new_tokens, page) * page
        for b in self.batches:
            for c in self.contexts:
                need = b * _pages(c + 1, page) * page
                if budget is not None and kv_bytes(v.spec, v.dtype, need) > budget:
                    self.skip(_what(v, "decode", b, c), f"the cache needs {_fmt_bytes(kv_bytes(v.spec, v.dtype, need))} "
                              f"beside {_fmt_bytes(weight_bytes)} of weights; {_fmt_bytes(free)} free")
                    continue
                fit.append((b, c))
                tokens = max(tokens, need)
        return fit, tokens + page  # one page more: a graphed step's padding rows write to a scratch page

    # ------------------------------------------------------------ lowgear
    def load(self, v: Variant, cache_tokens: int):
        import lowgear as lg

        if v.path:
            config = lg.Config(v.path)
            config.devices, config.dtype = [self.label], str(v.dtype).removeprefix("torch.")
        else:
            config = synthetic_config(v.spec, v.quant, self.device, v.dtype, self.label)
        model = lg.Model(config)
        cache = lg.Cache(model, max_seq_len=cache_tokens, page_size=self.args.page_size)
        model.load_autosplit(cache, progress=True)
        return model, cache

    def run_variant(self, v: Variant) -> None:
        if v.path:
            from ..config import Config

            source = Config(v.path).source
        else:
            source = RandomSource(v.spec, QUANTS[v.quant], torch.device("cpu"), v.dtype)
        weights = source_bytes(source, v.dtype)
        shapes, cache_tokens = self.shapes_that_fit(v, weights)
        self.total -= (len(self.batches) * len(self.contexts) - len(shapes)) * len(v.rungs)
        self.say(f"loading {v.spec.name or v.label} ({v.quant}, {_dt(v.dtype)}) on {self.device}: "
                 f"{_fmt_bytes(weights)} of weights, cache of {cache_tokens} tokens")
        t0 = time.perf_counter()
        model, cache = self.load(v, cache_tokens)
        self.models.append({"model": v.label, "quant": v.quant, "dtype": _dt(v.dtype), "spec": _spec_dict(v.spec),
                            "weight_bytes": step_weight_bytes(model, 0), "cache_bytes": cache.nbytes(),
                            "load_seconds": round(time.perf_counter() - t0, 2)})
        self._since = time.perf_counter()
        try:
            for rung in v.rungs:
                selection = self.use_rung(model, v, rung)
                if selection is None:
                    self.total -= len(shapes) + 2
                    continue
                with _t4_sdpa() if rung == T4_RUNG and self.device.type == "cuda" else nullcontext():
                    for b, c in shapes:
                        self.decode(model, cache, v, rung, b, c)
                    self.prefill_step(model, cache, v, rung)
                    self.generate(model, cache, v, rung)
        finally:
            del model, cache
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def use_rung(self, model, v: Variant, rung: str):
        """Point the loaded model at one attention rung; None (logged) when the rung cannot run here."""
        from ..attention.select import select_backend
        from ..config import Switches

        if rung == T4_RUNG:
            switches = Switches(True, False, False, False, None)
        else:
            switches = Switches(False, False, False, False, rung)
        entry = {"model": v.label, "quant": v.quant, "dtype": _dt(v.dtype), "rung": rung}
        try:
            selections = {}
            for info in model.devices:
                if info.label not in model.selections:
                    continue
                as_seen = info
                if rung == T4_RUNG and info.kind == "cuda":
                    as_seen = dataclasses.replace(info, compute_capability=(7, 5), name=f"{info.name} as sm_75")
                selections[info.label] = select_backend(as_seen, switches, v.dtype)
        except LowgearError as exc:
            self.rung_log.append({**entry, "available": False, "reason": str(exc)})
            self.say(f"rung {rung}: not available here: {exc}")
            return None
        model.selections.update(selections)
        chosen = sorted({s.name for s in selections.values()})
        self.rung_log.append({**entry, "available": True, "backend": ",".join(chosen),
                              "log": [dataclasses.asdict(d) for s in selections.values() for d in s.log]})
        self.say(f"rung {rung}: attention through {', '.join(chosen)}")
        return selections

    def decode(self, model, cache, v: Variant, rung: str, batch: int, context: int) -> None:
        """One decode step of `batch` sequences at `context`: a captured CUDA graph's replay where the rung
        can be captured (as the DynamicGenerator runs it), else the eager forward."""
        from ..attention.metadata import build_metadata

        what = _what(v, "decode", batch, context, rung)
        page = cache.page_size
        per_seq = _pages(context + 1, page)
        pages = cache.pool.allocate(batch * per_seq)
        tables = [pages[s * per_seq : (s + 1) * per_seq] for s in range(batch)]
        meta = build_metadata([1] * batch, [context + 1] * batch, tables, page, device=model.layer_devices[0])
        ids = torch.randint(0, v.spec.vocab_size, (batch,), device=model.layer_devices[0])
        graphs = self._graphs(model, cache, batch)
        _reset_peak(self.device)
        try:
            if graphs is not None:
                from ..engine.graphs import DecodeRow

                rows = [DecodeRow(5, context + 1, t) for t in tables]
                if graphs.run(rows) is None:  # no bucket or no scratch page: time what the generator would run
                    graphs.release()
                    graphs = None
            if graphs is not None:
                seconds = self.timer.median(lambda: graphs.run(rows), self.warmup, self.iters)
            else:
                seconds = self.timer.median(lambda: model.forward(ids, meta, cache), self.warmup, self.iters)
        except torch.OutOfMemoryError as exc:
            self.done += 1
            return self.skip(what, f"out of memory: {str(exc).splitlines()[0]}")
        finally:
            if graphs is not None:
                graphs.release()
            cache.pool.release(pages)
        weights, kv = step_weight_bytes(model, batch), kv_bytes(v.spec, cache.dtype, batch * (context + 1))
        self.add(what, seconds, batch / seconds, bytes_per_step=weights + kv, weight_bytes_per_step=weights, kv_bytes_per_step=kv,
                 cuda_graph=graphs is not None)

    def _graphs(self, model, cache, batch: int):
        """A DecodeGraphs for this batch, as the generator would build it; None where steps run eagerly."""
        from ..engine.graphs import DecodeGraphs, disabled_reason, kv_bound

        if self.args.no_graphs or disabled_reason(model, True, cache) is not None:
            return None
        return DecodeGraphs(model, cache, batch, kv_bound(model, cache))

    def prefill_step(self, model, cache, v: Variant, rung: str) -> None:
        from ..attention.metadata import build_metadata

        n = self.prefill
        what = _what(v, "prefill", 1, n, rung)
        meta = build_metadata([n], [n], [list(range(_pages(n, cache.page_size)))], cache.page_size, device=model.layer_devices[0])
        ids = torch.randint(0, v.spec.vocab_size, (n,), device=model.layer_devices[0])
        _reset_peak(self.device)
        try:
            seconds = self.timer.median(lambda: model.forward(ids, meta, cache), self.warmup, max(2, self.iters // 3))
        except torch.OutOfMemoryError as exc:
            self.done += 1
            return self.skip(what, f"out of memory: {str(exc).splitlines()[0]}")
        self.add(what, seconds, n / seconds, flops=prefill_flops(v.spec, n))

    def generate(self, model, cache, v: Variant, rung: str) -> None:
        """End to end through the DynamicGenerator: time to first token of a prompt, then decode speed."""
        import lowgear as lg

        what = _what(v, "generate", 1, self.prefill, rung)
        gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=_NullTokenizer(v.spec.vocab_size),
                                  paged=True, max_batch_size=1)
        g = torch.Generator().manual_seed(len(self.results))  # a fresh prompt: no prefix-cache hits
        for warm in (True, False):
            prompt = torch.randint(0, v.spec.vocab_size, (self.prefill,), generator=g).tolist()
            job = lg.DynamicJob(input_ids=prompt, max_new_tokens=self.new_tokens, gen_settings=lg.Sampler.Settings.greedy())
            self.timer.sync()
            t0 = time.perf_counter()
            gen.enqueue(job)
            first = None
            while not job.finished:
                if gen.iterate() and first is None:
                    first = time.perf_counter()
            end = time.perf_counter()
        if job.eos_reason == "error":  # e.g. float16 overflow in random weights: no speed to report
            self.skip(what, f"the job ended with an error: {job.error}")
            return
        n = len(job.generated)
        decode_tps = (n - 1) / (end - first) if n > 1 else None
        self.add(what, first - t0, decode_tps, ttft_ms=(first - t0) * 1e3, new_tokens=n)

    # ------------------------------------------------------------ the peers
    def run_llama_cpp(self, binary: str, v: Variant) -> None:
        """llama.cpp's own llama-batched-bench on the same GGUF file (bench/llamacpp.py)."""
        from . import llamacpp

        gpu = self.device.index if self.device.type == "cuda" else None
        peer = Variant(v.label, v.spec, v.quant, v.dtype, ["llama.cpp"], v.path)
        runs = [("decode", c, llamacpp.NEW_TOKENS, self.batches) for c in self.contexts]
        runs.append(("prefill", self.prefill, 1, [1]))
        for kind, prompt, new, batches in runs:
            try:
                rows = llamacpp.run(binary, v.path, prompt, new, batches, gpu)
            except LowgearError as exc:
                self.done += len(batches)
                self.skip({"engine": "llama.cpp", "model": v.label, "kind": kind, "context": prompt}, str(exc))
                continue
            figures = llamacpp.decode_figures(rows) if kind == "decode" else [llamacpp.prefill_figure(rows)]
            for f in figures:
                what = _what(peer, kind, f["batch"], f["context"], "llama.cpp", engine="llama.cpp")
                self.add(what, f["ms_per_step"] / 1e3, f["tokens_per_s"])

    def run_peer(self, spec: ModelSpec, label: str) -> None:
        from .peer import HFPeer

        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        for impl in _names(self.args.peer_attn):
            v = Variant(label, spec, "float", dtype, [impl])
            try:
                peer = HFPeer(spec, self.device, dtype, impl)
            except Exception as exc:  # transformers missing, or an attention implementation it lacks
                self.total -= len(self.batches) * len(self.contexts) + 1
                self.skip({"engine": "transformers", "model": label, "rung": impl}, f"{type(exc).__name__}: {exc}")
                continue
            try:
                for b in self.batches:
                    for c in self.contexts:
                        self.peer_measure(_what(v, "decode", b, c, impl, engine="transformers"),
                                          lambda: peer.decode_step(b, c), b)
                self.peer_measure(_what(v, "prefill", 1, self.prefill, impl, engine="transformers"),
                                  lambda: peer.prefill_step(self.prefill), self.prefill, flops=prefill_flops(spec, self.prefill))
            finally:
                peer.close()
                del peer
                gc.collect()

    def peer_measure(self, what: dict, make, tokens: int, **extra) -> None:
        _reset_peak(self.device)
        step = None
        try:
            step = make()
            seconds = self.timer.median(step, self.warmup, self.iters if what["kind"] == "decode" else max(2, self.iters // 3))
        except torch.OutOfMemoryError as exc:
            self.done += 1
            return self.skip(what, f"out of memory: {str(exc).splitlines()[0]}")
        finally:
            del step
            if self.device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        self.add(what, seconds, tokens / seconds, **extra)

    # ------------------------------------------------------------ figures
    def add(self, what: dict, seconds: float, tokens_per_s: float | None, **extra) -> None:
        r = {**what, "device": self.facts["name"], "ms_per_step": seconds * 1e3, "tokens_per_s": tokens_per_s, **extra}
        if "bytes_per_step" in r:
            r["roofline_ms"] = r["bytes_per_step"] / self.bandwidth * 1e3
            r["pct_roofline"] = 100.0 * r["roofline_ms"] / r["ms_per_step"]
        if "flops" in r:
            r["flops_per_s"] = r["flops"] / seconds
            r["pct_peak_flops"] = 100.0 * r["flops_per_s"] / self.matmul_flops
        r["memory"] = _memory(self.device)
        now = time.perf_counter()  # the figure's wall time, warmup and first-use kernel builds included
        r["wall_seconds"], self._since = round(now - self._since, 4), now
        self.results.append(r)
        self.tick(_line(r))

    def compare(self) -> None:
        """Each lowgear figure ÷ the fastest figure of each peer (transformers, llama.cpp) of the same
        model, kind, batch and context."""
        for engine, field in (("transformers", "vs_transformers"), ("llama.cpp", "vs_llama_cpp")):
            best: dict[tuple, dict] = {}
            for r in self.results:
                if r["engine"] == engine and r["tokens_per_s"]:
                    key = (r["model"], r["kind"], r["batch"], r["context"])
                    if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
                        best[key] = r
            for r in self.results:
                peer = best.get((r["model"], r["kind"], r["batch"], r["context"]))
                if r["engine"] == "lowgear" and peer is not None and r["tokens_per_s"]:
                    r[field] = {"ratio": r["tokens_per_s"] / peer["tokens_per_s"], "tokens_per_s": peer["tokens_per_s"],
                                "attn": peer["rung"], "dtype": peer["dtype"]}

    def run(self) -> dict:
        a = self.args
        self.facts = self.device_facts()
        variants = plan_variants(self.args, self.device)
        peers = [] if a.no_peer else list({v.label: v.spec for v in variants}.items())
        per_rung = len(self.batches) * len(self.contexts) + 2
        self.total = 2 + sum(len(v.rungs) * per_rung for v in variants) + len(peers) * len(_names(a.peer_attn)) * (per_rung - 1)
        self.say(f"lowgear bench on {self.facts['name']} ({self.device}); batches {self.batches}, contexts {self.contexts}, "
                 f"prefill {self.prefill} tokens")
        self.bandwidth = measure_bandwidth(self.timer, a.quick)
        self.tick(f"copy bandwidth {self.bandwidth / 1e9:.0f} GB/s (read + written) on {self.facts['name']}")
        matmul_dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.matmul_flops = measure_matmul(self.timer, matmul_dtype, a.quick)
        self.tick(f"{_dt(matmul_dtype)} matmul {_flops(self.matmul_flops)} on {self.facts['name']}")
        llama_cpp = None
        if a.llama_cpp:
            from .llamacpp import find_binary

            llama_cpp = find_binary(a.llama_cpp)
            gguf_files = {v.path: v for v in variants if v.path and v.path.endswith(".gguf")}
            if not gguf_files:
                raise LowgearError("--llama-cpp times llama.cpp on the same GGUF files: pass them with --model FILE.gguf[,FILE2.gguf]")
            self.total += len(gguf_files) * (len(self.batches) * len(self.contexts) + 1)
        for v in variants:
            self.run_variant(v)
        if llama_cpp is not None:
            for v in gguf_files.values():  # after lowgear's runs: lowgear's memory is back when llama.cpp loads
                self.run_llama_cpp(llama_cpp, v)
        for label, spec in peers:
            self.run_peer(spec, label)
        self.compare()
        return {
            "schema": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv),
            "device": self.facts,
            "measured": {"bandwidth_bytes_per_s": self.bandwidth, "matmul_flops_per_s": self.matmul_flops,
                         "matmul_dtype": _dt(matmul_dtype)},
            "settings": {"batches": self.batches, "contexts": self.contexts, "prefill_tokens": self.prefill,
                         "new_tokens": self.new_tokens, "warmup": self.warmup, "iters": self.iters,
                         "page_size": a.page_size, "quick": a.quick, "cpu_threads": torch.get_num_threads()},
            "models": self.models,
            "rungs": self.rung_log,
            "results": self.results,
            "skipped": self.skipped,
        }


# ---------------------------------------------------------------- small helpers
def _t4_sdpa():
    """torch's own sdpa kernels as an sm_75 GPU has them: no flash or cuDNN kernels (they need sm_80)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="decode/prefill speed vs the memory roofline and vs transformers; JSON + PNG",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", action="append", help=f"model shape(s), comma list: {', '.join(PRESETS)} "
                   "(default llama3.2-1b on a GPU, tiny on the CPU)")
    p.add_argument("--model", "-m", default=None, help="a .gguf file or HF folder (comma list) instead of a synthetic preset")
    p.add_argument("--quant", default=None, help=f"synthetic weight formats, comma list: {', '.join(QUANTS)} (fp16 is an alias of float; default "
                   f"{','.join(DEFAULT_QUANTS)})")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: the first GPU, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="activation dtype (default float16 on a GPU, float32 on the CPU)")
    p.add_argument("--batch", default=None, help="decode batch sizes, comma list (default 1,8,32,64)")
    p.add_argument("--context", default=None, help="decode context lengths, comma list (default 512,4096)")
    p.add_argument("--prefill", type=int, default=None, help="prompt tokens for prefill and time to first token (default 2048)")
    p.add_argument("--rungs", default="all", help=f"attention rungs, comma list of flash_attn, xformers, sdpa, triton, eager, {T4_RUNG}; or all")
    p.add_argument("--peer-attn", default="sdpa,eager", help="transformers attn_implementation(s) to time (the fastest is the peer)")
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    p.add_argument("--llama-cpp", default=None, metavar="DIR",
                   help="a folder with llama.cpp's llama-batched-bench: time it on the same --model GGUF files")
    p.add_argument("--page-size", type=int, default=256)
    p.add_argument("--no-graphs", action="store_true", help="time decode steps eagerly (default: CUDA-graph replay where the rung allows)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=15, help="timed steps per figure (the median is reported)")
    p.add_argument("--headroom-gib", type=float, default=4.0, help="GPU memory kept free when sizing caches")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="few iterations and (on the CPU) small shapes")
    p.add_argument("--out", default="bench-results", help="folder for bench.json and bench.png")
    p.add_argument("--plot-only", default=None, metavar="JSON", help="redraw the PNG of an earlier bench.json and print its table")
    p.set_defaults(func=main)


def main(args) -> int:
    if args.plot_only:
        with open(args.plot_only) as f:
            report = json.load(f)
        print(summary(report))
        png = os.path.splitext(args.plot_only)[0] + ".png"
        if plot(report, png) is None:
            require("matplotlib", "bench", "drawing the plot")
            raise LowgearError(f"drawing the plot failed: is matplotlib working? {install_hint('bench')}")
        print(f"wrote {png}")
        return 0
    if not args.no_peer:
        require("transformers", "bench", "lowgear bench's comparison with transformers (or pass --no-peer)")
    report = Bench(args).run()
    print(summary(report))
    write_outputs(report, args.out)
    return 0
