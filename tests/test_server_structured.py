"""Logprobs, structured output and tool calls on the OpenAI server, against a real `lowgear serve`.

The embedded SmolLM2 model serves on loopback; the official openai client asks. Logprobs meet a
log-softmax of Hugging Face transformers' logits on the same GGUF weights; JSON answers meet the
`jsonschema` validator; tool calls meet their tools' parameter schemas.
"""

from __future__ import annotations

import json
import math
import os

import jsonschema
import pytest
import torch

from test_server import client, http, start_model_server, stop_model_server

CTX = 1024


@pytest.fixture(scope="module")
def real():
    proc, base = start_model_server("--max-seq-len", str(CTX), "--cache-size", "4096", "--max-batch-size", "8")
    yield base
    stop_model_server(proc)


@pytest.fixture(scope="module")
def hf(smollm2_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path), dtype=torch.float32).eval()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log-softmax of transformers' logits at every position of `ids` (float64)."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)


# ------------------------------------------------------------------------------------ logprobs


def test_completion_logprobs_match_transformers(real, hf):
    prompt = [504, 3575, 282, 4649, 314]  # token ids: no tokenizer between the two sides
    c = client(real)
    out = c.completions.create(model="any", prompt=prompt, max_tokens=6, temperature=0, logprobs=5)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    stream = list(c.completions.create(model="any", prompt=prompt, max_tokens=6, temperature=0, logprobs=5,
                                       stream=True))
    streamed = [x for ch in stream if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)
    # greedy: the best alternative of each step is the token itself; offsets count the tokens' text
    offset = 0
    for tok, value, top, off in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset):
        assert off == offset
        offset += len(tok)
        assert len(top) == 5 and max(top.values()) == pytest.approx(value, abs=1e-6)
    # transformers over the prompt plus the generated tokens (greedy: each one is its step's argmax)
    ids = list(prompt)
    for i in range(6):
        ref = hf_logprobs(hf, ids)[-1]
        best = int(ref.argmax())
        assert lp.token_logprobs[i] == pytest.approx(float(ref[best]), abs=2e-3)
        top_ref = sorted(ref.tolist(), reverse=True)[:5]
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(top_ref, abs=2e-3)
        ids.append(best)


def test_chat_logprobs_shape_and_values(real, hf):
    c = client(real)
    msgs = [{"role": "user", "content": "Say hi."}]
    out = c.chat.completions.create(model="any", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                    top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy: the best
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert entry.logprob <= 0 and sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-6
    chunks = list(c.chat.completions.create(model="any", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                            top_logprobs=3, stream=True))
    streamed = [e.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content], abs=1e-6)
    # no logprobs asked: none given
    plain = c.chat.completions.create(model="any", messages=msgs, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, None),
])
def test_logprobs_limits_are_400_naming_the_field(real, path, body, param):
    status, answer = http(real, path, {"model": "any", "max_tokens": 2, **body})
    assert status == 400, answer
    assert "top_logprobs" in answer["error"]["message"] or "logprobs" in answer["error"]["message"]
    if param:
        assert answer["error"]["param"] == param


# ---------------------------------------------------------------------------- structured output

S = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": S}, "required": ["name"]},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000}}, "required": ["price"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1,
                                                 "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"city": S, "country": S}, "required": ["city", "country"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"status": {"const": "done"}, "count": {"type": "integer", "minimum": 0,
                                                                             "maximum": 9}},
     "required": ["status", "count"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1,
        "maximum": 999}, "roles": {"type": "array", "items": {"enum": ["admin", "dev"]}, "maxItems": 2}},
        "required": ["id", "roles"]}}, "required": ["user"]},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]}, "confidence": {
        "type": "number", "minimum": 0, "maximum": 1}}, "required": ["answer", "confidence"]},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {
        "sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["sku", "qty"]},
        "minItems": 1, "maxItems": 2}}, "required": ["items"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                          {"type": "null"}]}}, "required": ["value"]},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
     "required": ["date"]},
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": S,
                                      "c": {"type": "boolean"}}, "required": ["a", "b", "c"],
     "additionalProperties": False},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}}, "required": ["level"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "items": {"type": "array", "items": {
        "type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2}, "minItems": 2, "maxItems": 2}},
     "required": ["matrix"]},
    {"type": "object", "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\\\.com$"}},
     "required": ["email"]},
    {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 8},
                                      "name": S}, "required": ["kind", "legs", "name"]},
]
assert len(SCHEMAS) == 20


def _closed(schema):
    """Objects take no properties beyond those listed (what OpenAI's strict mode asks of a schema)."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if schema.get("type") == "object":
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [_closed(v) for v in schema]
    return schema


SCHEMAS = [_closed(s) for s in SCHEMAS]


def _ask_json(base: str, schema: dict, stream: bool) -> tuple[str, str]:
    c = client(base)
    kwargs = dict(model="any", temperature=0, max_tokens=80,
                  messages=[{"role": "system", "content": "Answer with JSON only."},
                            {"role": "user", "content": "Describe something small as JSON."}],
                  response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                                          "strict": True}})
    if not stream:
        out = c.chat.completions.create(**kwargs)
        return out.choices[0].message.content, out.choices[0].finish_reason
    chunks = list(c.chat.completions.create(stream=True, **kwargs))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    return text, [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_answers_validate(real, stream):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:  # batched together: constrained rows share steps
        answers = list(pool.map(lambda s: _ask_json(real, s, stream), SCHEMAS))
    unfinished = [(schema, text) for schema, (text, finish) in zip(SCHEMAS, answers) if finish != "stop"]
    assert not unfinished
    for schema, (text, _) in zip(SCHEMAS, answers):
        jsonschema.validate(json.loads(text), schema)


def test_json_object_and_vllm_fields(real):
    c = client(real)
    msgs = [{"role": "user", "content": "Pick one."}]
    out = c.chat.completions.create(model="any", messages=msgs, temperature=0, max_tokens=40,
                                    response_format={"type": "json_object"})
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    out = c.chat.completions.create(model="any", messages=msgs, temperature=0, max_tokens=10,
                                    extra_body={"guided_choice": ["alpha", "beta"]})
    assert out.choices[0].message.content in ("alpha", "beta")
    out = c.completions.create(model="any", prompt="Phone:", temperature=0, max_tokens=12,
                               extra_body={"guided_regex": "[0-9]{3}-[0-9]{4}"})
    assert __import__("re").fullmatch("[0-9]{3}-[0-9]{4}", out.choices[0].text), out.choices[0].text
    out = c.completions.create(model="any", prompt="Answer:", temperature=0, max_tokens=12,
                               extra_body={"guided_grammar": 'root ::= "yes" | "no"'})
    assert out.choices[0].text in ("yes", "no")
    out = c.chat.completions.create(model="any", messages=msgs, temperature=0, max_tokens=10,
                                    extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert out.choices[0].message.content in ("left", "right")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    out = c.chat.completions.create(model="any", messages=msgs, temperature=0, max_tokens=20,
                                    extra_body={"guided_json": schema})
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)


def test_constrained_and_free_rows_share_a_batch(real):
    """A free request's greedy answer is the same alone and beside constrained ones."""
    from concurrent.futures import ThreadPoolExecutor

    c = client(real)
    free = dict(model="any", messages=[{"role": "user", "content": "Name three colors."}], max_tokens=16, temperature=0)
    alone = c.chat.completions.create(**free).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_ask_json, real, SCHEMAS[i], False) for i in range(3)]
        beside = pool.submit(lambda: c.chat.completions.create(**free).choices[0].message.content).result()
        for f, schema in zip(futures, SCHEMAS):
            jsonschema.validate(json.loads(f.result()[0]), schema)
    assert beside == alone


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
    ({"structured_outputs": {"xml": "x"}}, "structured_outputs.xml"),
])
def test_bad_format_constraints_are_400_naming_the_field(real, extra, param):
    status, answer = http(real, "/v1/chat/completions", {"model": "any", "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "x"}], **extra})
    assert status == 400, answer
    assert answer["error"]["param"] == param, answer


def test_missing_library_is_one_clear_error(monkeypatch):
    import sys

    from lowgear.server import structured
    from lowgear.server.openai_types import APIError, ChatCompletionRequest

    monkeypatch.setitem(sys.modules, "llguidance", None)
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                response_format={"type": "json_object"})
    with pytest.raises(APIError, match=r"pip install 'lowgear\[structured\]'") as err:
        structured.request_grammar(object(), req)
    assert err.value.status == 400


# ---------------------------------------------------------------------------------- tool calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
CONVERT = {"type": "function", "function": {
    "name": "convert", "parameters": {"type": "object", "properties": {
        "amount": {"type": "integer", "minimum": 0, "maximum": 1000}, "to": {"enum": ["EUR", "USD"]}},
        "required": ["amount", "to"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_calls(calls, tools_by_name):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), tools_by_name[call.function.name]["parameters"])


def test_required_tool_choice_gives_a_valid_call(real):
    c = client(real)
    out = c.chat.completions.create(model="any", messages=ASK, tools=[WEATHER, CONVERT], tool_choice="required",
                                    temperature=0, max_tokens=60)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message.tool_calls, {t["function"]["name"]: t["function"] for t in (WEATHER, CONVERT)})


def test_named_tool_choice_calls_that_function(real):
    c = client(real)
    out = c.chat.completions.create(model="any", messages=ASK, tools=[WEATHER, CONVERT], temperature=0, max_tokens=60,
                                    tool_choice={"type": "function", "function": {"name": "convert"}},
                                    parallel_tool_calls=False)
    calls = out.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["convert"]
    _check_calls(calls, {"convert": CONVERT["function"]})


def test_streamed_tool_call_reassembles(real):
    c = client(real)
    chunks = list(c.chat.completions.create(model="any", messages=ASK, tools=[WEATHER], tool_choice="required",
                                            temperature=0, max_tokens=60, stream=True))
    calls: dict[int, dict] = {}
    for ch in chunks:
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                assert call["id"] is None and tc.function.name  # id, type and name come first, once
                call["id"], call["name"] = tc.id, tc.function.name
            call["arguments"] += tc.function.arguments or ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])
    whole = c.chat.completions.create(model="any", messages=ASK, tools=[WEATHER], tool_choice="required",
                                      temperature=0, max_tokens=60)
    assert whole.choices[0].message.tool_calls[0].function.arguments == calls[0]["arguments"]


def test_tool_results_go_back_into_the_conversation(real):
    c = client(real)
    first = c.chat.completions.create(model="any", messages=ASK, tools=[WEATHER], tool_choice="required",
                                      temperature=0, max_tokens=60)
    call = first.choices[0].message.tool_calls[0]
    follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                          "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    out = c.chat.completions.create(model="any", messages=follow, tools=[WEATHER], tool_choice="none",
                                    temperature=0, max_tokens=12)
    assert out.choices[0].message.content and out.choices[0].message.tool_calls is None
    assert out.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_requests_are_400(real, extra, param):
    status, answer = http(real, "/v1/chat/completions", {"model": "any", "max_tokens": 2, "messages": ASK, **extra})
    assert status == 400, answer
    assert answer["error"]["param"] == param


def test_langchain_bind_tools_turn(real):
    """LangChain's ChatOpenAI with bind_tools: a forced call, the tool's answer sent back, a reply."""
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Current weather of a city."""
        return f"sunny in {city}"

    llm = ChatOpenAI(base_url=real + "/v1", api_key="none", model="any", temperature=0, max_tokens=60, max_retries=0)
    messages = [HumanMessage("What is the weather in Paris?")]
    ai = llm.bind_tools([get_weather], tool_choice="required").invoke(messages)
    assert [c["name"] for c in ai.tool_calls] == ["get_weather"]
    call = ai.tool_calls[0]
    assert isinstance(call["args"].get("city"), str)
    messages += [ai, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    reply = llm.bind_tools([get_weather]).invoke(messages)
    assert reply.content or reply.tool_calls


ODD = [
    {"guided_json": "not json"}, {"guided_json": {"type": ["object", 5]}}, {"guided_json": {"$ref": "#/nope"}},
    {"guided_json": {"type": "string", "pattern": "("}}, {"guided_grammar": "%%%"}, {"guided_grammar": "root ::= ("},
    {"guided_choice": [""]}, {"guided_regex": ""}, {"structured_outputs": {"json": 5}},
    {"structured_outputs": {"json_object": True}}, {"response_format": {"type": "json_schema"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
    {"tools": [5]}, {"tools": []}, {"tools": [{"type": "function", "function": {"name": "a", "parameters": "x"}}]},
    {"tools": [{"type": "retrieval"}]}, {"tool_choice": 5}, {"tools": [WEATHER], "tool_choice": {"type": "function"}},
    {"messages": [{"role": "assistant", "tool_calls": [5]}]},
    {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "a", "arguments": "{bad"}}]}]},
    {"messages": [{"role": "tool", "content": "x", "tool_call_id": "c"}], "tools": [WEATHER]},
]


@pytest.mark.parametrize("extra", ODD)
def test_odd_constraint_and_tool_fields_never_5xx(real, extra):
    body = {"model": "any", "max_tokens": 3, "messages": ASK, **extra}
    status, answer = http(real, "/v1/chat/completions", body)
    assert status < 500, answer
    if status >= 400:
        assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]


# ------------------------------------------------------------------------- vLLM's stopping fields


def test_ignore_eos_and_min_tokens(real):
    """`ignore_eos`: no stop token ends the answer, so it runs to max_tokens; `min_tokens`: at least that
    many tokens come before a stop token may end it (vLLM's extension fields, as benchmark clients send)."""
    c = client(real)
    msgs = [{"role": "user", "content": "Say hi."}]
    free = c.chat.completions.create(model="any", messages=msgs, max_tokens=40, temperature=0)
    assert free.choices[0].finish_reason == "stop" and free.usage.completion_tokens < 40  # the model stops early
    n = free.usage.completion_tokens
    out = c.chat.completions.create(model="any", messages=msgs, max_tokens=40, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 40 and out.choices[0].finish_reason == "length"
    longer = c.chat.completions.create(model="any", messages=msgs, max_tokens=40, temperature=0,
                                       extra_body={"min_tokens": n + 3})
    assert longer.usage.completion_tokens >= n + 3
    bad = http(real, "/v1/chat/completions", {"model": "any", "messages": msgs, "min_tokens": -1})
    assert bad[0] == 400 and "min_tokens" in json.dumps(bad[1])
