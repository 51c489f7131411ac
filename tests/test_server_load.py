"""A bounded load test of `lowgear serve` on loopback: 64 concurrent streaming clients, a quarter of them
held to a JSON schema, a third leaving early.

Every stream that runs to its end must be complete and well-formed, and every constrained one must
parse and validate against its schema (jsonschema); every client that leaves must have its job
cancelled or finished; afterwards no page is in use, nothing is queued or running, and the server
still answers. (What constrained neighbours cost the free clients' speed: benchmarks/server_load.py.) Traffic goes only to 127.0.0.1, the request count is fixed and the whole test has
a deadline.
"""

from __future__ import annotations

import asyncio
import json
import time

import jsonschema
import openai
import pytest

from test_server import get_metrics, start_model_server, stop_model_server, wait_until

CLIENTS = 64
MAX_TOKENS = 8
CONSTRAINED_MAX_TOKENS = 24  # room for the whole document: the grammar ends it
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["ok", "n"], "additionalProperties": False}
DEADLINE_S = 480
PROMPTS = [
    "Say hello.",
    "Name a fruit.",
    "What is two plus two?",
    "Write one word about the sea, and then explain why you chose it.",
]


@pytest.fixture(scope="module")
def server():
    proc, base = start_model_server("--max-seq-len", "256", "--cache-size", "4096", "--max-batch-size", "16")
    yield base
    stop_model_server(proc)


async def one_client(c: openai.AsyncOpenAI, i: int) -> dict:
    """Client i: every 4th (i % 4 == 0) asks for JSON of SCHEMA; i % 4 == 3 leaves after its first words,
    i % 8 == 1 right after the headers."""
    leave_after_words = i % 4 == 3
    leave_at_once = i % 8 == 1
    constrained = i % 4 == 0
    extra = ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA, "strict": True}}}
             if constrained else {})
    stream = await c.chat.completions.create(
        model="any", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        max_tokens=CONSTRAINED_MAX_TOKENS if constrained else MAX_TOKENS,
        temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True}, **extra)
    if leave_at_once:
        await stream.close()
        return {"i": i, "left": True}
    chunks = []
    async for chunk in stream:
        chunks.append(chunk)
        if leave_after_words and any(ch.choices and ch.choices[0].delta.content for ch in chunks):
            await stream.close()
            return {"i": i, "left": True}
    return {"i": i, "left": False, "chunks": chunks, "constrained": constrained}


def check_complete(result: dict) -> None:
    chunks = result["chunks"]
    assert chunks, "an empty stream"
    assert len({ch.id for ch in chunks}) == 1
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    with_choices = [ch for ch in chunks if ch.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    reasons = [ch.choices[0].finish_reason for ch in with_choices]
    assert reasons[-1] in ("stop", "length") and all(r is None for r in reasons[:-1]), reasons
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None, "the usage chunk before [DONE] is missing"
    limit = CONSTRAINED_MAX_TOKENS if result["constrained"] else MAX_TOKENS
    assert 1 <= usage.completion_tokens <= limit
    if reasons[-1] == "length":
        assert usage.completion_tokens == limit
    text = "".join(ch.choices[0].delta.content or "" for ch in with_choices)
    assert text or reasons[-1] == "stop"
    if result["constrained"]:
        assert reasons[-1] == "stop", (text, reasons[-1])  # the grammar, not the token limit, ended it
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.slow
def test_64_streaming_clients_some_leaving(server):
    async def run():
        c = openai.AsyncOpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=DEADLINE_S)
        try:
            return await asyncio.wait_for(asyncio.gather(*(one_client(c, i) for i in range(CLIENTS))), DEADLINE_S)
        finally:
            await c.close()

    started = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - started
    finished = [r for r in results if not r["left"]]
    left = [r for r in results if r["left"]]
    assert len(finished) + len(left) == CLIENTS and len(left) >= CLIENTS // 4
    for r in finished:
        check_complete(r)
    assert sum(r["constrained"] for r in finished) == CLIENTS // 4

    def settled():
        m = get_metrics(server)
        done = m["lowgear_requests_finished_total"] + m["lowgear_requests_cancelled_total"]
        return (m["lowgear_pages_in_use"] == 0 and m["lowgear_running_jobs"] == 0 and m["lowgear_queue_length"] == 0
                and m["lowgear_active_requests"] == 0 and done == CLIENTS) and m

    m = wait_until(settled, timeout=60, interval=0.5)
    assert m, f"the server did not settle: {get_metrics(server)}"
    assert m["lowgear_requests_failed_total"] == 0
    assert m["lowgear_requests_cancelled_total"] >= 1  # at least the clients that left at once were cancelled

    c = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)
    after = c.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                      temperature=0)
    assert after.choices[0].message.content and after.usage.completion_tokens <= 4
    print(f"{CLIENTS} clients ({len(left)} left early) in {elapsed:.1f}s; "
          f"{m['lowgear_requests_cancelled_total']:.0f} jobs cancelled; "
          f"{m['lowgear_generated_tokens_total']:.0f} tokens in {m['lowgear_steps_total']:.0f} steps")
