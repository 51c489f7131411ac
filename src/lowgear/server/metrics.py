"""/metrics in Prometheus' text exposition format, from the engine's snapshot.

Only gauges and counters, written by hand: the format is a few lines per metric and a client library
would be a dependency for nothing.

Beside lowgear's own metrics come the gauges that Kubernetes inference gateways route on (the Gateway
API Inference Extension's model server protocol, which llm-d's scheduler follows): queued requests,
running requests and KV cache usage as a fraction. Their endpoint picker scrapes vLLM's names by
default, so those are the default names here; `--router-metric KIND=NAME` renames one (repeatable).
"""

from __future__ import annotations

import re

# name, type, help, key in Engine.stats()
METRICS = (
    ("lowgear_queue_length", "gauge", "Jobs waiting for a slot in the batch", "queued"),
    ("lowgear_running_jobs", "gauge", "Jobs in the running batch", "running"),
    ("lowgear_active_requests", "gauge", "Request choices the server is streaming or collecting", "active_requests"),
    ("lowgear_pages_in_use", "gauge", "KV cache pages held by jobs", "pages_in_use"),
    ("lowgear_pages_total", "gauge", "KV cache pages in the pool", "pages_total"),
    ("lowgear_tokens_per_second", "gauge", "Generated tokens per second over the last 10 seconds", "tokens_per_second"),
    ("lowgear_generated_tokens_total", "counter", "Tokens generated since start", "generated_tokens_total"),
    ("lowgear_prompt_tokens_total", "counter", "Prompt tokens accepted since start", "prompt_tokens_total"),
    ("lowgear_requests_finished_total", "counter", "Jobs that ran to a stop or their token limit", "requests_finished_total"),
    ("lowgear_requests_cancelled_total", "counter", "Jobs cancelled, mostly by clients that went away", "requests_cancelled_total"),
    ("lowgear_requests_failed_total", "counter", "Jobs ended by a generator error", "requests_failed_total"),
    ("lowgear_steps_total", "counter", "Generator steps run since start", "steps_total"),
    ("lowgear_spec_proposed_tokens_total", "counter", "Speculative tokens proposed and checked", "spec_proposed_total"),
    ("lowgear_spec_accepted_tokens_total", "counter", "Speculative tokens the target accepted", "spec_accepted_total"),
)


# kind: (type, help, default names); the picker's defaults, both names of vLLM's KV usage gauge
# why: docs/decisions/016-server-packages-and-gateway-metric-names.md
ROUTER_METRICS = {
    "queued": ("gauge", "Requests waiting for a batch slot (model server protocol: TotalQueuedRequests)",
               ("vllm:num_requests_waiting",)),
    "running": ("gauge", "Requests in the running batch (model server protocol: TotalRunningRequests)",
                ("vllm:num_requests_running",)),
    "kv_usage": ("gauge", "Fraction of KV cache pages held by jobs, 0 to 1 (model server protocol: KVCacheUtilization)",
                 ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")),
}
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def parse_router_metric(text: str) -> tuple[str, str]:
    """`KIND=NAME` (argparse type of --router-metric); an empty NAME leaves that gauge out."""
    kind, sep, name = text.partition("=")
    if not sep or kind not in ROUTER_METRICS:
        raise ValueError(f"expected KIND=NAME with KIND one of {', '.join(ROUTER_METRICS)}, got {text!r}")
    if name and not _NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a Prometheus metric name (letters, digits, '_' and ':', not first a digit)")
    return kind, name


def router_names(overrides=()) -> dict[str, tuple[str, ...]]:
    """The names each router gauge is exported under: the defaults, with each overridden kind replaced."""
    names = {kind: spec[2] for kind, spec in ROUTER_METRICS.items()}
    given: dict[str, list[str]] = {}
    for kind, name in overrides or ():
        given.setdefault(kind, []).extend([name] if name else [])
    names.update({kind: tuple(dict.fromkeys(v)) for kind, v in given.items()})
    return names


def router_values(stats: dict) -> dict[str, float]:
    total = float(stats.get("pages_total") or 0)
    return {"queued": stats.get("queued", 0), "running": stats.get("running", 0),
            "kv_usage": float(stats.get("pages_in_use") or 0) / total if total else 0.0}


def _number(value) -> str:
    value = float(value or 0)
    return str(int(value)) if value.is_integer() else repr(value)


def render(stats: dict, model_name: str, router: dict[str, tuple[str, ...]] | None = None) -> str:
    """Every metric; `router`: the names of the router gauges (router_names(); None: the defaults)."""
    label = model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    rows = [(name, kind, help_text, "model", stats.get(key, 0)) for name, kind, help_text, key in METRICS]
    values = router_values(stats)
    for kind, names in (router or router_names()).items():  # labelled as vLLM labels them
        rows += [(name, *ROUTER_METRICS[kind][:2], "model_name", values[kind]) for name in names]
    lines = []
    for name, kind, help_text, label_key, value in rows:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f'{name}{{{label_key}="{label}"}} {_number(value)}')
    return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """Metric name -> value, labels dropped (for tests and quick scripts)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        out[name_labels.split("{", 1)[0]] = float(value)
    return out
