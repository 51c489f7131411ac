"""The server fuzzed from its own OpenAPI schema with Schemathesis (issue 25): valid and malformed
requests to every endpoint; none may be answered 5xx, and every error is OpenAI-shaped JSON.

Shared by tests/test_server_schema_fuzz.py (bounded, a tiny random model) and
benchmarks/fuzz_server.py (longer, optionally the embedded model)."""

from __future__ import annotations

import json

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hyp_seed
from schemathesis import GenerationMode


def check_response(case, response) -> str | None:
    """None if the answer is acceptable, else what is wrong with it."""
    status = response.status_code
    if status >= 500:
        return f"{status} for {case.method} {case.path} body={case.body!r:.300}: {response.text[:300]}"
    if status >= 400:
        try:
            body = json.loads(response.text)
        except ValueError:
            return f"{status} is not JSON for {case.method} {case.path}: {response.text[:200]!r}"
        err = body.get("error") if isinstance(body, dict) else None
        if case.path.startswith("/v1/messages"):  # Anthropic's API answers in Anthropic's error shape
            if body.get("type") != "error" or not isinstance(err, dict) or set(err) != {"type", "message"} \
                    or not err["message"]:
                return f"{status} is not Anthropic's error shape for {case.path}: {response.text[:200]!r}"
        elif not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"} or not err["message"]:
            return f"{status} is not OpenAI's error shape for {case.method} {case.path}: {response.text[:200]!r}"
    return None


def _one_case(entry: dict):
    def one(case):
        response = case.call()
        entry["cases"] += 1
        entry["statuses"][response.status_code] = entry["statuses"].get(response.status_code, 0) + 1
        entry["5xx"] += response.status_code >= 500
        problem = check_response(case, response)
        if problem is not None:
            entry["failures"].append(problem)

    return one


def run(app, examples: int, seed: int | None = None, derandomize: bool = False, timeout: float = 600,
        progress: bool = False) -> dict:
    """Fuzz every operation of `app`'s schema; {operation: {"cases": n, "5xx": k, "failures": [..]}}."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    schema.config.update(request_timeout=timeout)  # a long answer on a slow CPU is not a failure
    report: dict[str, dict] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        entry = report.setdefault(label, {"cases": 0, "5xx": 0, "statuses": {}, "failures": []})
        fn = given(operation.as_strategy())(_one_case(entry))
        fn = settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])(fn)
        if seed is not None:
            fn = hyp_seed(seed)(fn)
        fn()
        if progress:
            print(f"  {label}: {entry['cases']} cases, {entry['5xx']} 5xx, {entry['statuses']}", flush=True)
    return report
