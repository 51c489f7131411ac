"""The `lowgear` command: doctor, generate, chat, serve, bench.

Every user-facing failure is a LowgearError, printed as one line (`--debug` shows the traceback).
Subcommands owned by other modules (doctor, serve, bench) register themselves through
`add_parser(subparsers)` and run through `main(args)`; the model-building options are shared.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ..config import add_device_options, add_speculation_options, add_threads_option, apply_device_options, apply_threads
from ..errors import LowgearError


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and cache")
    g.add_argument("--model", "-m", default=None, help="a .gguf file or a Hugging Face folder (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    g.add_argument("--max-seq-len", default=None, help="cache size in tokens, or 'auto' (largest that fits)")
    g.add_argument("--page-size", type=int, default=None, help="paged KV cache page size in tokens (default 256)")
    add_speculation_options(p)
    add_threads_option(p)
    add_device_options(p)


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", "-n", type=int, default=200)
    g.add_argument("--temperature", "-t", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=0.8)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--greedy", action="store_true", help="temperature 0: always the most likely token")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampler_settings(args):
    from ..engine.sampler import SamplerSettings

    s = SamplerSettings(
        temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        token_repetition_penalty=args.repetition_penalty,
        token_presence_penalty=args.presence_penalty,
        token_frequency_penalty=args.frequency_penalty,
    )
    s.validate()
    return s


def build_engine(args, max_batch_size: int = 1, progress: bool = True):
    """Config → Model → Cache → load_autosplit → Tokenizer → DynamicGenerator, from CLI options."""
    import lowgear as lg

    apply_threads(args)
    config = lg.Config(args.model or lg.default_model_path())
    apply_device_options(config, args)
    max_seq_len = args.max_seq_len
    if max_seq_len is not None and max_seq_len != "auto":
        try:
            max_seq_len = int(max_seq_len)
        except ValueError:
            raise LowgearError(f"--max-seq-len takes a number of tokens or 'auto', not {max_seq_len!r}") from None
    if max_seq_len is None:
        max_seq_len = min(config.max_seq_len or 4096, 4096)
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=max_seq_len, page_size=args.page_size, lazy=True)
    model.load_autosplit(cache, progress=progress)
    if max_seq_len == "auto":
        _say_auto_size(model, cache)
    tokenizer = lg.Tokenizer(config)
    from ..model.load import speculation_kwargs

    generator = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer, paged=True, max_batch_size=max_batch_size,
                                    **speculation_kwargs(args, model, cache, progress))
    return model, cache, tokenizer, generator


def _say_auto_size(model, cache) -> None:
    """`--max-seq-len auto` says what it chose, and on the CPU why (it is bounded there: placement.cpu_auto_cap)."""
    from ..platform.placement import cpu_auto_cap

    tokens = getattr(getattr(model, "plan", None), "max_seq_len", None) or getattr(cache, "max_seq_len", None)
    per_token = cache.bytes_per_token_per_layer(cache.dtype or model.dtype) * model.spec.num_layers
    cap = cpu_auto_cap(model.spec, model.devices, per_token)
    why = cap[1] if cap is not None else "the most that fits in free device memory"
    print(f"lowgear: --max-seq-len auto: {tokens} tokens ({why})", file=sys.stderr)


class ReplyStats:
    """Time to first token and decode speed of one reply, for --stats."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first: float | None = None
        self.end: float | None = None
        self.tokens = 0
        self.prompt_tokens = 0

    def line(self) -> str:
        end = self.end or time.perf_counter()
        if self.first is None or self.tokens == 0:
            return f"lowgear: stats: no tokens generated in {end - self.start:.2f} s"
        decode = end - self.first
        rate = f"{(self.tokens - 1) / decode:.1f} tokens/s" if self.tokens > 1 and decode > 0 else "n/a tokens/s"
        threads = torch.get_num_threads()
        return (f"lowgear: stats: {self.tokens} tokens, {rate} after the first; time to first token "
                f"{self.first - self.start:.3f} s (prompt {self.prompt_tokens} tokens); total {end - self.start:.2f} s; "
                f"{threads} CPU thread{'s' if threads > 1 else ''}")


def stream_reply(generator, tokenizer, prompt: str, args, settings, stops, *, add_bos=False, special=False,
                 stats: ReplyStats | None = None):
    """Yield the reply's text as it is generated (ExLlamaV2's job API); an interrupted or abandoned
    reply cancels its job, so its cache pages are free for the next one."""
    import lowgear as lg

    ids = tokenizer.encode(prompt, add_bos=add_bos, encode_special_tokens=special)
    job = lg.DynamicJob(ids, max_new_tokens=args.max_new_tokens, gen_settings=settings, stop_conditions=stops,
                        seed=args.seed)
    if stats is not None:
        stats.prompt_tokens = int(ids.shape[-1])
    generator.enqueue(job)
    try:
        while not job.finished:
            for r in generator.iterate():
                if r["job"] is not job:
                    continue
                if stats is not None and r.get("new_tokens"):
                    if stats.first is None:
                        stats.first = time.perf_counter()
                    stats.tokens = r["new_tokens"]
                if r["text"]:
                    yield r["text"]
    finally:
        if stats is not None:
            stats.end = time.perf_counter()
        if not job.finished:
            generator.cancel(job)


def cmd_generate(args) -> int:
    settings = sampler_settings(args)
    _, _, tokenizer, generator = build_engine(args, progress=not args.quiet)
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    stops = sorted(tokenizer.stop_token_ids) + list(args.stop)
    if not args.chat:
        sys.stdout.write(args.prompt)
    stats = ReplyStats() if args.stats else None
    for chunk in stream_reply(generator, tokenizer, prompt, args, settings, stops, add_bos=args.add_bos,
                              special=args.chat, stats=stats):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats is not None:
        print(stats.line(), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    settings = sampler_settings(args)
    _, _, tokenizer, generator = build_engine(args, progress=True)
    stops = sorted(tokenizer.stop_token_ids) + list(args.stop)
    stats = [None]

    def reply(history):
        stats[0] = ReplyStats() if args.stats else None
        prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True)
        return stream_reply(generator, tokenizer, prompt, args, settings, stops, special=True, stats=stats[0])

    def after_reply():
        if stats[0] is not None:
            print(stats[0].line(), file=sys.stderr)

    print("lowgear chat: /reset clears the history, /exit quits; Ctrl-C stops a reply.", file=sys.stderr)
    return chat_loop(reply, system=args.system, after_reply=after_reply)


def chat_loop(reply, system: str | None = None, read=input, out=None, after_reply=None) -> int:
    """The chat REPL. `reply(history)` yields the assistant's text for the history so far.

    Ctrl-C during a reply stops that reply (its partial text stays in the history, as llama.cpp and
    Ollama keep it) and the conversation goes on; Ctrl-C twice at the prompt, Ctrl-D or /exit quits."""
    out = out or sys.stdout
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    base = list(history)
    interrupted_at_prompt = False
    while True:
        try:
            line = read("> ")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            if interrupted_at_prompt:
                out.write("\n")
                return 130
            interrupted_at_prompt = True
            print("\n(Ctrl-C again, Ctrl-D or /exit quits)", file=sys.stderr)
            continue
        interrupted_at_prompt = False
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            history = list(base)
            out.write("(history cleared)\n")
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        parts: list[str] = []
        chunks = reply(list(history))
        try:
            for chunk in chunks:
                parts.append(chunk)
                out.write(chunk)
                out.flush()
        except KeyboardInterrupt:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # cancels the job
            print("\n(reply stopped)", file=sys.stderr)
        out.write("\n")
        out.flush()
        if after_reply is not None:
            after_reply()
        text = "".join(parts).strip()
        if text:
            history.append({"role": "assistant", "content": text})
        else:  # nothing said: drop the unanswered turn so roles still alternate
            history.pop()


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line (not the whole usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowgear", description="LLM inference on the GPU you have (and on the CPU).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete a prompt, streaming to stdout")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user turn")
    p.add_argument("--add-bos", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--stats", action="store_true", help="print tokens/s and time to first token to stderr")
    add_model_options(p)
    add_sampling_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with history (/reset, /exit)")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--stats", action="store_true", help="print tokens/s and time to first token after each reply (stderr)")
    add_model_options(p)
    add_sampling_options(p)
    p.set_defaults(func=cmd_chat)

    from ..bench import command as bench_command
    from ..server import add_parser as add_serve_parser
    from . import doctor

    doctor.add_parser(sub)
    add_serve_parser(sub)
    bench_command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LowgearError as exc:
        if args.debug:
            raise
        print(f"lowgear: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
