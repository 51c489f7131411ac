"""/metrics in Prometheus' text exposition format, from the engine's snapshot.

Only gauges and counters, written by hand: the format is a few lines per metric and a client library
would be a dependency for nothing.
"""

from __future__ import annotations

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


def _number(value) -> str:
    value = float(value or 0)
    return str(int(value)) if value.is_integer() else repr(value)


def render(stats: dict, model_name: str) -> str:
    label = model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    lines = []
    for name, kind, help_text, key in METRICS:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f'{name}{{model="{label}"}} {_number(stats.get(key, 0))}')
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
