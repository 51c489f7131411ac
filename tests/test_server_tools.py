"""Tool calling pieces without a model: the three families' call formats parsed from hand-written
answers, request checks, chat templates that read `tools` / `enable_thinking`, and the streamed
deltas reassembled the way OpenAI's client does."""

from __future__ import annotations

import json

import pytest

from lowgear.server import tools
from lowgear.server.openai_types import APIError, ChatCompletionRequest
from lowgear.tokenizer.chat import render_chat, template_variables

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("text,content,calls", [
    # Hermes / Qwen
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("get_weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
     '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', "Let me check.",
     [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    ('<tool_call>\n{"name": "get_time", "arguments": {}}', None, [("get_time", {})]),  # no closing tag (EOS)
    # Llama 3.x: bare JSON with "parameters", or after <|python_tag|>
    ('{"name": "get_weather", "parameters": {"city": "Rome"}}', None, [("get_weather", {"city": "Rome"})]),
    ('<|python_tag|>{"name": "get_time", "parameters": {}}', None, [("get_time", {})]),
    ('{"name": "get_weather", "parameters": {"city": "A"}}; {"name": "get_time", "parameters": {}}', None,
     [("get_weather", {"city": "A"}), ("get_time", {})]),
    # Mistral: a JSON list after [TOOL_CALLS], and the newer name[ARGS]{...} form
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lima"}}]', None,
     [("get_weather", {"city": "Lima"})]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Kyiv"}', None, [("get_weather", {"city": "Kyiv"})]),
    # not calls: all content
    ("The weather is fine.", "The weather is fine.", []),
    ('{"name": "x"}', '{"name": "x"}', []),  # JSON, but no arguments: an answer, not a call
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
])
def test_parse_each_family(text, content, calls):
    got_content, got = tools.parse_tool_calls(text)
    assert got_content == content
    assert [(c["name"], json.loads(c["arguments"])) for c in got] == calls


def _req(**kw):
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)


class _Tok:
    chat_template = None
    special_ids = ()

    def piece_to_id(self, piece):
        return None


@pytest.mark.parametrize("kw,param", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
])
def test_bad_tool_requests_name_the_field(kw, param):
    with pytest.raises(APIError) as err:
        tools.plan(_req(**kw), _Tok())
    assert err.value.status == 400 and err.value.param == param


def test_tool_choice_none_renders_no_tools():
    assert tools.plan(_req(tools=[WEATHER], tool_choice="none"), _Tok()) is None


# A template in the style of Qwen3's: reads tools and enable_thinking, writes <tool_call> blocks.
QWEN_LIKE = """{%- if tools %}<|im_start|>system
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Answer with <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tc in message.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{%- if enable_thinking is defined and enable_thinking is false %}
<think>

</think>
{%- endif %}
{% endif %}"""


def test_a_template_that_reads_tools_gets_them():
    tok = _Tok()
    tok.chat_template = QWEN_LIKE
    assert {"tools", "enable_thinking"} <= template_variables(QWEN_LIKE)
    req = ChatCompletionRequest(model="m", tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    plan = tools.plan(req, tok)
    assert plan.in_template and plan.family == tools.HERMES
    text = render_chat(tools.template_messages(req, plan), QWEN_LIKE, **plan.template_variables(),
                       enable_thinking=False)
    assert '"name": "get_weather"' in text and "<tools>" in text  # the tool's signature
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
    assert text.rstrip().endswith("<think>\n\n</think>")  # enable_thinking=False reached the template


def test_a_template_without_tools_gets_the_fallback_prompt():
    req = ChatCompletionRequest(model="m", tools=[WEATHER], messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                              "function": {"name": "get_weather", "arguments": '{"city": "X"}'}}]}])
    plan = tools.plan(req, _Tok())
    assert not plan.in_template
    msgs = tools.template_messages(req, plan)
    assert msgs[0]["content"].startswith("Be brief.\n\nYou can call these functions.")
    assert json.dumps(WEATHER["function"]) in msgs[0]["content"]
    assert msgs[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "X"}}\n</tool_call>'


def _reassemble(deltas: list[dict]) -> tuple[str, list[dict]]:
    """What OpenAI's client-side accumulation does: concatenate content; per call index, take the id,
    type and name from the first delta and concatenate the arguments fragments."""
    content, calls = "", {}
    for d in deltas:
        content += d.get("content") or ""
        for tc in d.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
            if "id" in tc:
                assert call["id"] is None, "id sent twice"
                call["id"], call["name"] = tc["id"], tc["function"]["name"]
                assert tc["type"] == "function" and tc["function"]["arguments"] == ""
            else:
                assert call["id"] is not None, "arguments before the call's id and name"
                call["arguments"] += tc["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("pieces", [
    ["Sure", ". <tool", "_call>\n{\"name\": \"get_weather\", ", "\"arguments\": {\"city\": \"San Francisco, CA\"}}",
     "\n</tool_call>\n<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>"],
    list("Sure. <tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"San Francisco, CA\"}}</tool_call>"
         "<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>"),
])
def test_streamed_deltas_reassemble(pieces):
    plan = tools.ToolPlan([WEATHER, TIME], "auto", True, tools.HERMES, False)
    stream = tools.ToolStream(plan)
    deltas = [d for p in pieces for d in stream.push(p)] + stream.finish()
    content, calls = _reassemble(deltas)
    assert content.strip() == "Sure."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "San Francisco, CA"}), ("get_time", {})]
    assert len({c["id"] for c in calls}) == 2 and stream.called
    assert sum(1 for d in deltas if "tool_calls" in d and "id" not in d["tool_calls"][0]) >= 2  # fragments


def test_streamed_plain_text_is_content_and_markers_are_held_back():
    plan = tools.ToolPlan([WEATHER], "auto", True, tools.HERMES, False)
    stream = tools.ToolStream(plan)
    assert stream.push("Hello <tool") == [{"content": "Hello "}]  # "<tool" may begin a call
    assert stream.push("s are fun") == [{"content": "<tools are fun"}]
    assert stream.finish() == [] and not stream.called


def test_forced_call_schemas_are_closed():
    """Objects without additionalProperties get false (hand-written expectation); stated ones stay."""
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}},
                                               "c": {"type": "array", "items": {"type": "object"}},
                                               "d": {"type": "object", "additionalProperties": True}}}
    assert tools.closed(schema) == {
        "type": "object", "additionalProperties": False, "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "string"}}, "additionalProperties": False},
            "c": {"type": "array", "items": {"type": "object", "additionalProperties": False}},
            "d": {"type": "object", "additionalProperties": True}}}


def test_markers_that_are_special_tokens_are_named_by_id_in_grammars():
    class Tok:
        special_ids = {9}

        def piece_to_id(self, piece):
            return {"[TOOL_CALLS]": 9, "<tool_call>": 4}.get(piece)

    assert tools._literal(Tok(), "[TOOL_CALLS]") == "<[9]>"  # llguidance's syntax for token 9
    assert tools._literal(Tok(), "<tool_call>") == '"<tool_call>"'  # a plain token: its text
    assert tools._literal(Tok(), "</tool_call>") == '"</tool_call>"'
