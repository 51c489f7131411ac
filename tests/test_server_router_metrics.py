"""/metrics for Kubernetes inference gateways: the model server protocol's gauges under vLLM's names.

The embedded model serves one job at a time (batch size 1) from a 4-page cache, so a second request
must wait: the queued gauge says 1. The KV usage gauge is checked against the pages counted here
from the cache's page pool (reference counts, not the pool's own counter) and against the count
worked out by hand from the prompt and max_tokens.
"""

from __future__ import annotations

import argparse
import json
import math

import httpx
import pytest

from lowgear.server import configure_parser, load_engine, metrics
from lowgear.server.app import create_app

from test_server import ThreadServer, get_metrics, http, wait_until

PAGE, PAGES = 256, 4
GATEWAY_DEFAULTS = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                    "vllm:gpu_cache_usage_perc")


@pytest.fixture(scope="module")
def served(smollm2_path):
    engine = load_engine(smollm2_path, max_seq_len=PAGE * PAGES, cache_size=PAGE * PAGES, max_batch_size=1,
                         model_name="smol").start()
    renamed = create_app(engine, router_metrics=[("queued", "queue_size"), ("kv_usage", "kv_fraction"),
                                                 ("running", "")])
    with ThreadServer(create_app(engine)) as plain, ThreadServer(renamed) as custom:
        yield engine, plain.base, custom.base
    engine.stop()


def pages_held(engine) -> int:
    pool = engine.generator.pool
    return sum(pool.refcount(i) > 0 for i in range(pool.num_pages))


def open_stream(base: str, body: dict, wait_for_token: bool):
    """Start a streamed completion; with wait_for_token, return once its first token arrived (it stays open)."""
    client = httpx.Client(timeout=120)
    response = client.send(client.build_request("POST", base + "/v1/completions", json=body), stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()  # kept: a dropped iterator closes the connection, which cancels the job
    if wait_for_token:
        for line in lines:
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break
    return client, response, lines


def test_queued_running_and_kv_usage_move(served):
    engine, base, _ = served
    idle = get_metrics(base)
    assert set(GATEWAY_DEFAULTS) <= set(idle)
    assert [idle[n] for n in GATEWAY_DEFAULTS] == [0, 0, 0, 0]

    prompt = "1, 2, 3, 4, 5, 6, 7, 8,"  # counting on: no end of text for a long while
    max_tokens = 600
    first = open_stream(base, {"model": "smol", "prompt": prompt, "max_tokens": max_tokens, "stream": True}, True)
    prompt_tokens = len(engine.tokenizer.encode(prompt, add_bos=engine.tokenizer.add_bos_default).reshape(-1))
    # a job holds pages for its prompt and its whole max_tokens from the start
    expected_pages = math.ceil((prompt_tokens + max_tokens) / PAGE)
    assert 1 < expected_pages < PAGES
    second = open_stream(base, {"model": "smol", "prompt": prompt, "max_tokens": 5, "stream": True}, False)
    try:
        busy = wait_until(lambda: (m := get_metrics(base))["vllm:num_requests_waiting"] == 1 and m, timeout=30)
        assert busy, get_metrics(base)
        assert busy["vllm:num_requests_running"] == 1
        held = pages_held(engine)
        assert held == expected_pages
        assert busy["vllm:kv_cache_usage_perc"] == pytest.approx(held / PAGES)
        assert busy["vllm:gpu_cache_usage_perc"] == busy["vllm:kv_cache_usage_perc"]
        assert http(base, "/health") == (200, {"status": "ok", "model": "smol"})
    finally:
        for client, response, _ in (first, second):
            response.close()
            client.close()
    done = wait_until(lambda: (m := get_metrics(base))["vllm:num_requests_waiting"] == 0
                      and m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0 and m, timeout=60)
    assert done, get_metrics(base)
    assert pages_held(engine) == 0


def test_names_are_configurable(served):
    _, _, base = served
    text = http(base, "/metrics")[1]
    values = metrics.parse(text)
    assert values["queue_size"] == 0 and values["kv_fraction"] == 0
    assert not set(GATEWAY_DEFAULTS) & set(values)  # renamed or dropped ("running=")
    assert "# TYPE kv_fraction gauge" in text
    assert 'queue_size{model_name="smol"} 0' in text


def test_the_cli_option():
    parser = configure_parser(argparse.ArgumentParser(exit_on_error=False))
    args = parser.parse_args(["--router-metric", "kv_usage=vllm:gpu_cache_usage_perc", "--router-metric", "kv_usage=kv"])
    assert metrics.router_names(args.router_metric)["kv_usage"] == ("vllm:gpu_cache_usage_perc", "kv")
    assert metrics.router_names(args.router_metric)["queued"] == ("vllm:num_requests_waiting",)
    for bad in ("queue=x", "kv_usage", "kv_usage=9lives", "running=a b"):
        with pytest.raises((argparse.ArgumentError, SystemExit)):
            parser.parse_args(["--router-metric", bad])
