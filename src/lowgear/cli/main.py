"""The `lowgear` command: doctor, generate, chat, serve, bench.

Every user-facing failure is a LowgearError, printed as one line (`--debug` shows the traceback).
Subcommands owned by other modules (doctor, serve, bench) register themselves through
`add_parser(subparsers)` and run through `main(args)`; the model-building options are shared.
"""

from __future__ import annotations

import argparse
import sys

from ..config import add_device_options, apply_device_options
from ..errors import LowgearError


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and cache")
    g.add_argument("--model", "-m", default=None, help="a .gguf file or a Hugging Face folder (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    g.add_argument("--max-seq-len", default=None, help="cache size in tokens, or 'auto' (largest that fits)")
    g.add_argument("--page-size", type=int, default=None, help="paged KV cache page size in tokens (default 256)")
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
    tokenizer = lg.Tokenizer(config)
    generator = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer, paged=True, max_batch_size=max_batch_size)
    return model, cache, tokenizer, generator


def cmd_generate(args) -> int:
    settings = sampler_settings(args)
    _, _, tokenizer, generator = build_engine(args, progress=not args.quiet)
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    stops = sorted(tokenizer.stop_token_ids) + list(args.stop)
    if not args.chat:
        sys.stdout.write(args.prompt)
    for chunk in generator.stream(prompt, max_new_tokens=args.max_new_tokens, gen_settings=settings,
                                  stop_conditions=stops, seed=args.seed, add_bos=args.add_bos,
                                  encode_special_tokens=args.chat):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    settings = sampler_settings(args)
    _, _, tokenizer, generator = build_engine(args, progress=True)
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    base = list(history)
    stops = sorted(tokenizer.stop_token_ids) + list(args.stop)
    print("lowgear chat: /reset clears the history, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            history = list(base)
            print("(history cleared)")
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True)
        reply = []
        for chunk in generator.stream(prompt, max_new_tokens=args.max_new_tokens, gen_settings=settings,
                                      stop_conditions=stops, seed=args.seed, encode_special_tokens=True):
            reply.append(chunk)
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply).strip()})


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
    add_model_options(p)
    add_sampling_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with history (/reset, /exit)")
    p.add_argument("--system", default=None, help="a system prompt")
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
