"""POST /v1/messages, Anthropic's Messages API, driven by the official `anthropic` client.

A live loopback server with the embedded SmolLM2 model answers both the Anthropic and the OpenAI
route; the Anthropic answers must equal the OpenAI route's on the same conversation (greedy), the
event sequence is Anthropic's as documented (written out here by hand), and the translation of
tools and tool calls is checked against hand-written OpenAI and Anthropic shapes (the client's own
types validate the folded message).
"""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from lowgear.server import load_engine
from lowgear.server.anthropic import EventTranslator, fold, parse_request, to_openai
from lowgear.server.app import create_app

from test_server import ThreadServer, client, fake_server, http, wait_until

MODEL = "smol"
GREEDY = {"temperature": 0}  # the client no longer has a temperature argument; the API still takes it
SYSTEM = "You answer in one short sentence."
ASK = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def served(smollm2_path):
    engine = load_engine(smollm2_path, max_seq_len=512, cache_size=1024, max_batch_size=4, model_name=MODEL).start()
    open_server, keyed_server = ThreadServer(create_app(engine)), ThreadServer(create_app(engine, api_key="sekrit"))
    with open_server, keyed_server:
        yield engine, open_server.base, keyed_server.base
    engine.stop()


def claude(base: str, key: str = "none") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=120)


def openai_answer(base: str, messages: list[dict], max_tokens: int, **kw):
    return client(base).chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
                                                **kw)


def raw_events(base: str, body: dict) -> list[tuple[str, dict]]:
    events = []
    with httpx.stream("POST", base + "/v1/messages", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == kind
                events.append((kind, data))
    return events


def test_message_and_stream_equal_the_chat_route(served):
    _, base, _ = served
    c = claude(base)
    whole = c.messages.create(model=MODEL, max_tokens=16, system=SYSTEM, messages=ASK, extra_body=GREEDY)
    same = openai_answer(base, [{"role": "system", "content": SYSTEM}, *ASK], 16)
    assert whole.type == "message" and whole.role == "assistant" and whole.model == MODEL
    assert [b.type for b in whole.content] == ["text"]
    assert whole.content[0].text == same.choices[0].message.content
    assert (whole.stop_reason, same.choices[0].finish_reason) in (("max_tokens", "length"), ("end_turn", "stop"))
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (same.usage.prompt_tokens,
                                                                     same.usage.completion_tokens)
    # the system prompt reached the model: without it the prompt is another one
    plain = openai_answer(base, ASK, 1)
    assert plain.usage.prompt_tokens != whole.usage.input_tokens

    with c.messages.stream(model=MODEL, max_tokens=16, system=SYSTEM, messages=ASK, extra_body=GREEDY) as stream:
        streamed_text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed_text == whole.content[0].text
    assert final.content[0].text == whole.content[0].text and final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_the_event_sequence(served):
    _, base, _ = served
    body = {"model": MODEL, "max_tokens": 6, "messages": ASK, "stream": True, "system": [{"type": "text", "text": SYSTEM}],
            **GREEDY}
    events = raw_events(base, body)
    kinds = [k for k, _ in events]
    deltas = kinds.count("content_block_delta")
    assert deltas >= 1
    assert kinds == ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * deltas + \
        ["content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert (start["role"], start["content"], start["stop_reason"]) == ("assistant", [], None)
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert all(d["index"] == 0 and d["delta"]["type"] == "text_delta" for k, d in events if k == "content_block_delta")
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 6


def test_stop_sequences(served):
    _, base, _ = served
    c = claude(base)
    full = c.messages.create(model=MODEL, max_tokens=16, messages=ASK, extra_body=GREEDY).content[0].text
    assert len(full) > 12, full
    stop = full[len(full) // 2: len(full) // 2 + 3]  # a piece from inside the answer
    cut = full[: full.index(stop)]
    stopped = c.messages.create(model=MODEL, max_tokens=16, messages=ASK, stop_sequences=["zzqx", stop],
                                extra_body=GREEDY)
    assert (stopped.content[0].text, stopped.stop_reason, stopped.stop_sequence) == (cut, "stop_sequence", stop)
    with c.messages.stream(model=MODEL, max_tokens=16, messages=ASK, stop_sequences=[stop], extra_body=GREEDY) as s:
        final = s.get_final_message()
    assert (final.content[0].text, final.stop_reason, final.stop_sequence) == (cut, "stop_sequence", stop)


def test_multi_turn_history(served):
    _, base, _ = served
    history = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
               {"role": "user", "content": [{"type": "text", "text": "Name "}, {"type": "text", "text": "a fruit."}]}]
    got = claude(base).messages.create(model=MODEL, max_tokens=8, messages=history, extra_body=GREEDY)
    same = openai_answer(base, [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                                {"role": "user", "content": "Name a fruit."}], 8)
    assert got.content[0].text == same.choices[0].message.content


@pytest.mark.parametrize("body, status, kind, named", [
    ({"model": MODEL, "messages": ASK}, 400, "invalid_request_error", "max_tokens"),
    ({"model": MODEL, "max_tokens": 0, "messages": ASK}, 400, "invalid_request_error", "max_tokens"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "temperature": 1.5}, 400, "invalid_request_error", "temperature"),
    ({"model": MODEL, "max_tokens": 5, "messages": []}, 400, "invalid_request_error", "messages"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     400, "invalid_request_error", "'image'"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}]}, 400, "invalid_request_error", "messages.0.content.0"),
    ({"model": MODEL, "max_tokens": 5, "messages": [*ASK, {"role": "assistant", "content": "Red,"}]},
     400, "invalid_request_error", "messages.1"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_request_error",
     "messages.0.role"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "stop_sequences": ["a", "b", "c", "d", "e"]}, 400,
     "invalid_request_error", "stop_sequences"),
    ({"model": MODEL, "max_tokens": 5000, "messages": ASK}, 400, "invalid_request_error", "max_tokens"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "tool_choice": {"type": "tool"}}, 400, "invalid_request_error",
     "tool_choice"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "tempurature": 0}, 400, "invalid_request_error", "tempurature"),
    ({"model": "gpt-4", "max_tokens": 5, "messages": ASK}, 404, "not_found_error", "gpt-4"),
])
def test_bad_requests_in_anthropic_shape(served, body, status, kind, named):
    _, base, _ = served
    for stream in (False, True):
        code, answer = http(base, "/v1/messages", {**body, "stream": stream})
        assert code == status, answer
        assert answer["type"] == "error" and answer["error"]["type"] == kind and set(answer["error"]) == {"type", "message"}
        assert named in answer["error"]["message"], answer


def test_bad_requests_through_the_client(served):
    engine, base, keyed = served
    c = claude(base)
    with pytest.raises(anthropic.BadRequestError) as info:
        c.messages.create(model=MODEL, max_tokens=5000, messages=ASK)
    assert info.value.status_code == 400 and info.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        c.messages.create(model="claude-nope", max_tokens=5, messages=ASK)
    for raw in (b"{not json", b"[1, 2]", b'"text"'):
        code, answer = http(base, "/v1/messages", raw=raw)
        assert code == 400 and answer["error"]["type"] == "invalid_request_error", answer
    # --api-key: Anthropic's clients send it as x-api-key
    with pytest.raises(anthropic.AuthenticationError):
        claude(keyed, "wrong").messages.create(model=MODEL, max_tokens=2, messages=ASK)
    assert claude(keyed, "sekrit").messages.create(model=MODEL, max_tokens=2, messages=ASK).usage.output_tokens == 2
    assert engine.alive


def test_a_closed_stream_cancels_its_job(served):
    engine, base, _ = served
    before = engine.stats()["requests_cancelled_total"]
    body = {"model": MODEL, "max_tokens": 400, "messages": ASK, "stream": True}
    with httpx.stream("POST", base + "/v1/messages", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if "content_block_delta" in line:
                break  # leave after the first token
    assert wait_until(lambda: engine.stats()["requests_cancelled_total"] > before, timeout=30)
    assert wait_until(lambda: engine.stats()["running"] == 0 and engine.stats()["pages_in_use"] == 0, timeout=30)


def test_a_failing_generation_mid_stream_is_an_error_event():
    gen, engine, server = fake_server(fail_on_step=4)
    with server:
        body = {"model": "m", "max_tokens": 20, "messages": ASK, "stream": True}
        events = []
        with httpx.stream("POST", server.base + "/v1/messages", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert events[0]["type"] == "message_start" and events[-1]["type"] == "error"
        assert events[-1]["error"]["type"] == "api_error" and "simulated step failure" in events[-1]["error"]["message"]
        gen.fail_on_step = gen.steps + 4
        with pytest.raises(anthropic.APIStatusError):
            with claude(server.base).messages.stream(model="m", max_tokens=20, messages=ASK) as s:
                s.get_final_message()
        assert http(server.base, "/health")[0] == 200  # the server goes on
    engine.stop()


def test_a_crash_behind_the_chat_route_is_an_anthropic_500():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lowgear.server import anthropic as layer

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def broken():
        raise RuntimeError("planted bug")

    layer.add_routes(app)
    with TestClient(app, raise_server_exceptions=False) as test:
        for stream in (False, True):
            r = test.post("/v1/messages", json={"model": "m", "max_tokens": 3, "messages": ASK, "stream": stream})
            assert r.status_code == 500
            assert r.json() == {"type": "error", "error": {"type": "api_error",
                                                           "message": "generation failed: RuntimeError: planted bug"}}


# -------------------------------------------------------------- the translation, by hand


TOOLS = [{"name": "get_weather", "description": "Weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def test_request_translation_of_tools_and_tool_blocks():
    req = parse_request({
        "model": "m", "max_tokens": 50, "system": "Be brief.", "tools": TOOLS,
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"], "top_k": 5,
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                              {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                               "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": [{"type": "text", "text": "18 C, sunny"}]},
                                         {"type": "text", "text": "Thanks!"}]},
        ]})
    assert to_openai(req) == {
        "model": "m", "max_tokens": 50, "stream": True, "stream_options": {"include_usage": True},
        "top_k": 5, "stop": ["END"],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Let me look.",
             "tool_calls": [{"id": "toolu_1", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C, sunny"},
            {"role": "user", "content": "Thanks!"},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                    "parameters": TOOLS[0]["input_schema"]}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
    }
    for choice, expected in (("auto", "auto"), ("any", "required"), ("none", "none")):
        body = to_openai(parse_request({"model": "m", "max_tokens": 1, "messages": ASK, "tools": TOOLS,
                                        "tool_choice": {"type": choice}}))
        assert body["tool_choice"] == expected
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = to_openai(parse_request({"model": "m", "max_tokens": 1, "messages": ASK,
                                    "output_config": {"format": {"type": "json_schema", "schema": schema}}}))
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}


def test_tool_call_chunks_become_tool_use_events():
    """OpenAI's streamed tool call (as its API sends one) -> Anthropic's tool_use block and input_json_delta events."""
    t = EventTranslator("m", [])
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "Checking."}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                                                            "function": {"name": "get_weather", "arguments": ""}}]},
                      "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
                      "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]},
                      "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}},
    ]
    events = t.start()
    for ch in chunks:
        events += t.chunk(ch)
    events += t.end()
    assert [(k, d.get("index")) for k, d in events] == [
        ("message_start", None), ("content_block_start", 0), ("ping", None), ("content_block_delta", 0),
        ("content_block_stop", 0), ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1),
        ("content_block_stop", 1), ("message_delta", None), ("message_stop", None)]
    assert events[5][1]["content_block"] == {"type": "tool_use", "id": "call_9", "name": "get_weather", "input": {}}
    assert events[6][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"city": '}
    assert events[9][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    message = anthropic.types.Message.model_validate(fold(events))
    assert message.stop_reason == "tool_use"
    assert message.content[0].text == "Checking."
    assert (message.content[1].type, message.content[1].name, message.content[1].input) == \
        ("tool_use", "get_weather", {"city": "Oslo"})
    assert (message.usage.input_tokens, message.usage.output_tokens) == (30, 12)


def test_a_named_tool_is_called_through_the_anthropic_client(served):
    """tool_choice naming a tool: the official client gets a tool_use block whose input validates against
    the tool's input_schema (jsonschema), streamed and not, and the tool's result goes back in."""
    import jsonschema

    _, base, _ = served
    c = claude(base)
    choice = {"type": "tool", "name": "get_weather"}
    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    msg = c.messages.create(model=MODEL, max_tokens=48, messages=ask, tools=TOOLS, tool_choice=choice, extra_body=GREEDY)
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name == "get_weather"
    jsonschema.validate(uses[0].input, TOOLS[0]["input_schema"])
    with c.messages.stream(model=MODEL, max_tokens=48, messages=ask, tools=TOOLS, tool_choice=choice,
                           extra_body=GREEDY) as stream:
        streamed = stream.get_final_message()
    assert [(b.name, b.input) for b in streamed.content if b.type == "tool_use"] == [(uses[0].name, uses[0].input)]
    back = ask + [{"role": "assistant", "content": [{"type": "tool_use", "id": uses[0].id, "name": "get_weather",
                                                      "input": uses[0].input}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "Sunny, 21 C"}]}]
    reply = c.messages.create(model=MODEL, max_tokens=16, messages=back, tools=TOOLS, extra_body=GREEDY)
    assert reply.role == "assistant" and reply.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_the_route_is_in_the_openapi_schema(served):
    _, base, _ = served
    code, schema = http(base, "/openapi.json")
    assert code == 200
    ref = schema["paths"]["/v1/messages"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/MessagesRequest"
    assert "max_tokens" in schema["components"]["schemas"]["MessagesRequest"]["required"]
