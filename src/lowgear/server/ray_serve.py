"""Replicas on Ray Serve: one lowgear engine per replica, the same HTTP routes behind Ray's proxy.

Each replica loads the model and runs its own generator (continuous batching inside the replica);
Ray's HTTP proxy spreads requests over the replicas. A replica's app is the one `lowgear serve` runs
(`create_app`: the OpenAI routes, /v1/messages, /health, /metrics), built on the replica when it starts
(Serve's FastAPI ingress with a builder), with an `x-lowgear-replica` header on every answer saying
which replica gave it. On a cluster with GPUs each replica asks Ray for its GPU(s)
(`ray_actor_options={"num_gpus": ...}`); Ray sets CUDA_VISIBLE_DEVICES and the replica's model
spreads over what it was given.

From Python (a Ray user's script, or `serve run lowgear.server.ray_serve:app_builder model=PATH replicas=2`):

    from ray import serve
    from lowgear.server.ray_serve import build_app
    serve.run(build_app("model.gguf", replicas=2), route_prefix="/")

From the CLI: `lowgear serve --ray --replicas 2 [--model PATH ...]`.
The model path must be readable at the same place on every node that runs a replica.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from ..errors import require

REPLICA_HEADER = "x-lowgear-replica"
FEATURE = "lowgear serve --ray"


class ReplicaHeader:
    """ASGI middleware: names the replica that answered, in a response header (streams untouched)."""

    def __init__(self, app, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), self.header])
            await send(message)

        await self.app(scope, receive, send_with_header)


def replica_app(settings: dict[str, Any]):
    """Runs on a replica when it starts: load the engine and put the server's app in front of it."""
    from . import load_engine
    from .app import create_app

    if settings.get("threads"):
        import torch

        torch.set_num_threads(int(settings["threads"]))
    names = list(settings.get("model_names") or [])
    engine = load_engine(settings["model"], max_seq_len=settings.get("max_seq_len", "auto"),
                         cache_size=settings.get("cache_size"), max_batch_size=settings["max_batch_size"],
                         model_name=names[0] if names else None).start()
    app = create_app(engine, api_key=settings.get("api_key"), allow_any_model=settings.get("allow_any_model", False),
                     model_names=tuple(names[1:]), router_metrics=settings.get("router_metrics") or ())
    app.add_middleware(ReplicaHeader, replica=f"{socket.gethostname()}:{os.getpid()}")
    return app


def build_app(model: str | None = None, *, replicas: int = 1, num_gpus: float | None = None, num_cpus: float = 1,
              max_batch_size: int | None = None, max_seq_len="auto", cache_size=None, model_names=(),
              api_key: str | None = None, allow_any_model: bool = False, router_metrics=(), threads: int | None = None,
              name: str = "lowgear"):
    """A Ray Serve application of `replicas` lowgear engines (bind it with serve.run).

    `num_gpus`: GPUs per replica; None asks for one when the Ray cluster has GPUs, else none.
    The other arguments are `lowgear serve`'s options of the same names."""
    ray = require("ray", "ray", FEATURE)
    serve = require("ray.serve", "ray", FEATURE)
    from . import DEFAULT_MAX_BATCH_SIZE

    if model is None:
        import lowgear

        model = lowgear.default_model_path()
    if num_gpus is None:
        num_gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0
    settings = {"model": os.path.abspath(model), "max_batch_size": max_batch_size or DEFAULT_MAX_BATCH_SIZE,
                "max_seq_len": max_seq_len, "cache_size": cache_size, "model_names": list(model_names),
                "api_key": api_key, "allow_any_model": allow_any_model, "router_metrics": list(router_metrics),
                "threads": threads}

    def build():  # evaluated on each replica as it starts
        return replica_app(settings)

    deployment = serve.deployment(serve.ingress(build)(), name=name)
    return deployment.options(num_replicas=replicas,
                              ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus}).bind()


def app_builder(args: dict[str, str]):
    """For `serve run lowgear.server.ray_serve:app_builder model=PATH replicas=2 num_gpus=1 ...`."""
    known = {"model": str, "replicas": int, "num_gpus": float, "num_cpus": float, "max_batch_size": int,
             "threads": int, "api_key": str}
    from ..errors import ConfigError

    unknown = set(args) - set(known)
    if unknown:
        raise ConfigError(f"unknown argument(s) {', '.join(sorted(unknown))}: lowgear's Ray app takes "
                          f"{', '.join(known)}")
    return build_app(**{k: known[k](v) for k, v in args.items()})


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_from_cli(args) -> int:
    """`lowgear serve --ray`: start (or join, with RAY_ADDRESS) a Ray cluster and serve until Ctrl-C."""
    ray = require("ray", "ray", FEATURE)
    serve = require("ray.serve", "ray", FEATURE)
    import time

    if args.model is None:
        import lowgear

        args.model = lowgear.default_model_path()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=args.log_level == "debug")
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_app(args.model, replicas=args.replicas, max_batch_size=args.max_batch_size,
                    max_seq_len=args.max_seq_len, cache_size=args.cache_size, model_names=args.model_name or (),
                    api_key=args.api_key, allow_any_model=args.allow_any_model, router_metrics=args.router_metric,
                    threads=args.threads)
    serve.run(app, name="lowgear", route_prefix="/")
    signal.signal(signal.SIGTERM, _interrupt)  # a stop from outside shuts the replicas down as Ctrl-C does
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"lowgear serve: {args.replicas} Ray Serve replica(s) of {os.path.basename(args.model)} on "
          f"http://{host}:{args.port}", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
