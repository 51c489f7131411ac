"""Schemathesis over the server's own OpenAPI schema, on a tiny random model: valid and malformed
requests to every endpoint, no 5xx, every error in OpenAI's shape. Longer runs (and the embedded
model): benchmarks/fuzz_server.py."""

import os

import pytest

pytest.importorskip("schemathesis")

from lowgear.bench.synthetic import write_gguf  # noqa: E402
from lowgear.server import load_engine  # noqa: E402
from lowgear.server.app import create_app  # noqa: E402

from server_fuzz_lib import check_response, run  # noqa: E402

EXAMPLES = int(os.environ.get("LOWGEAR_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    path = write_gguf(tmp_path_factory.mktemp("sf") / "tiny.gguf", hidden_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, intermediate_size=64, seed=2)
    engine = load_engine(path, max_seq_len=64, cache_size=128, max_batch_size=4).start()
    yield create_app(engine, allow_any_model=True)
    engine.stop()


def test_schema_lists_the_request_bodies(app):
    schema = app.openapi()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert "seed" in schema["components"]["schemas"]["CompletionRequest"]["properties"]


def test_no_request_gets_a_5xx(app):
    report = run(app, EXAMPLES, derandomize=True)
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"} <= set(report)
    failures = [f for entry in report.values() for f in entry["failures"]]
    assert not failures, "\n".join(failures[:5])
    statuses = {s for entry in report.values() for s in entry["statuses"]}
    assert 200 in statuses and 400 in statuses  # both valid and malformed requests were made


def test_the_check_sees_a_plain_text_500():
    class Case:
        method, path, body = "POST", "/v1/completions", {}

    class Response:
        status_code, text = 500, "Internal Server Error"

    assert "500" in check_response(Case, Response)
