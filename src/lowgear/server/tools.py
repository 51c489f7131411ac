"""Tool calling: OpenAI's `tools` / `tool_choice` / `parallel_tool_calls` on /v1/chat/completions.

- Checking: every tool is {"type": "function", "function": {"name", "description"?, "parameters"?}};
  a tool with no name, or a `tool_choice` naming a function no tool defines, is a 400 naming the field.
- Rendering: the tools go to the model's own chat template as its `tools` variable (HF's
  convention: Qwen, Hermes, Llama 3.x and Mistral templates read it). A template that does not read
  `tools` gets them in a system message instead (`fallback_prompt`): the signatures as JSON and the
  Hermes format, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, to answer in. Earlier
  assistant turns' `tool_calls` go to the template as HF's message fields, or as that text in the
  fallback; `tool` messages keep their role, `tool_call_id` and `name`.
- Formats, one per model family, chosen from the template: Hermes / Qwen (`<tool_call>` blocks),
  Llama 3.x (a bare JSON object {"name", "parameters"}, optionally after `<|python_tag|>`), Mistral
  (`[TOOL_CALLS]` then a JSON list of {"name", "arguments"}). `parse_tool_calls` reads all three.
- Forcing: `tool_choice` "required" or a named function compiles the family's format, with each
  tool's parameter schema, into an llguidance grammar (server/structured.py), so even a small model
  answers with a valid call. Its objects take only the properties they list unless they say
  otherwise (`closed`, as OpenAI's strict mode). "auto" parses whatever the model wrote; "none"
  renders no tools.
- Streaming (`ToolStream`): text is streamed as content until a call marker appears (a tail that
  may start one is held back); each call is then sent as OpenAI does: a delta with its index, id,
  type and function name (arguments ""), then deltas with fragments of its arguments.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .openai_types import APIError

HERMES, LLAMA3, MISTRAL = "hermes", "llama3", "mistral"
MARKERS = {HERMES: "<tool_call>", LLAMA3: "<|python_tag|>", MISTRAL: "[TOOL_CALLS]"}
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
ARGUMENT_FRAGMENT = 24  # characters of arguments per streamed delta

FALLBACK_PROMPT = (
    "You can call these functions. Their signatures, as JSON:\n{signatures}\n"
    "To call one, answer with <tool_call>{{\"name\": <function name>, \"arguments\": <arguments as a JSON "
    "object>}}</tool_call>, one such block per call and nothing else around it."
)


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def check_tools(tools: Any) -> list[dict]:
    """The request's tools as {"type": "function", "function": {...}} dicts; a 400 naming the field if not."""
    if not isinstance(tools, list) or not tools:
        raise _bad("tools must be a non-empty list of {'type': 'function', 'function': {...}}", "tools")
    out, names = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise _bad(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", f"tools[{i}].type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise _bad(f"tools[{i}].function must be an object with a 'name'", f"tools[{i}].function")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise _bad(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'; got {name!r}",
                       f"tools[{i}].function.name")
        if name in names:
            raise _bad(f"tools[{i}].function.name {name!r} is defined twice", f"tools[{i}].function.name")
        names.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise _bad(f"tools[{i}].function.parameters must be a JSON schema object", f"tools[{i}].function.parameters")
        clean = {"name": name}
        if isinstance(fn.get("description"), str):
            clean["description"] = fn["description"]
        clean["parameters"] = params
        out.append({"type": "function", "function": clean})
    return out


def check_choice(choice: Any, tools: list[dict]) -> str | dict:
    """"auto" | "none" | "required" | {"name": ...} (a named function); a 400 naming tool_choice if not."""
    if choice is None:
        return "auto"
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name in {t["function"]["name"] for t in tools}:
            return {"name": name}
        raise _bad(f"tool_choice names the function {name!r}, which no tool defines", "tool_choice")
    raise _bad("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}",
               "tool_choice")


def family_of(template: str | None, reads_tools: bool) -> str:
    """The tool-call format a chat template teaches (Hermes when it teaches none: our fallback prompt)."""
    if not reads_tools or not template:
        return HERMES
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or "<|eom_id|>" in template or '"parameters"' in template:
        return LLAMA3
    return HERMES


@dataclass
class ToolPlan:
    """What a request's tools change: the prompt, the grammar, the parsing of the answer."""

    tools: list[dict]
    choice: str | dict
    parallel: bool
    family: str
    in_template: bool
    names: set[str] = field(default_factory=set)

    # Call markers are special tokens in many vocabularies (Llama's <|python_tag|>, Mistral's
    # [TOOL_CALLS], Qwen's <tool_call> in some files): the answer keeps them in its text for parsing.
    decode_special_tokens = True

    # -- the prompt -----------------------------------------------------------------------

    def template_variables(self) -> dict:
        return {"tools": self.tools} if self.in_template else {}

    def messages(self, messages: list[dict]) -> list[dict]:
        if self.in_template:
            return messages
        signatures = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in self.tools)
        prompt = FALLBACK_PROMPT.format(signatures=signatures)
        out = [dict(m) for m in messages]
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt
        else:
            out.insert(0, {"role": "system", "content": prompt})
        return out

    # -- forcing ---------------------------------------------------------------------------

    def grammar(self, tokenizer) -> str | None:
        """The llguidance grammar of a forced call ("required" or a named function), else None."""
        if self.choice == "auto":
            return None
        from .structured import checked, lark_grammar

        tools = [t["function"] for t in self.tools]
        if isinstance(self.choice, dict):
            tools = [f for f in tools if f["name"] == self.choice["name"]]
        key = "parameters" if self.family == LLAMA3 else "arguments"
        calls = [{"type": "object", "properties": {"name": {"const": f["name"]}, key: closed(f["parameters"])},
                  "required": ["name", key], "additionalProperties": False} for f in tools]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
        call = "%json " + json.dumps(schema)
        more = len(self.tools) - 1 if self.parallel and not isinstance(self.choice, dict) else 0

        def calls_of(item: str, sep: str) -> str:  # one item, then up to `more` more (one per tool)
            return item + (f' ({json.dumps(sep)} {item}){{0,{more}}}' if more else "")

        if self.family == HERMES:
            open_, close = _literal(tokenizer, "<tool_call>"), _literal(tokenizer, "</tool_call>")
            lark = f'start: {calls_of("block", chr(10))}\nblock: {open_} "\\n" call "\\n" {close}\ncall: {call}'
        elif self.family == MISTRAL:
            lark = f'start: {_literal(tokenizer, MARKERS[MISTRAL])} "[" {calls_of("call", ",")} "]"\ncall: {call}'
        else:
            lark = f'start: {calls_of("call", ";")}\ncall: {call}'
        return checked(tokenizer, lark_grammar(lark), "tools")

    # -- the answer ------------------------------------------------------------------------

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, calls in OpenAI's shape) from a whole answer."""
        content, calls = parse_tool_calls(text)
        if not self.parallel:
            calls = calls[:1]
        return content, [openai_call(c) for c in calls]


def closed(schema: Any) -> Any:
    """A parameter schema whose objects take only the properties they list, unless they say otherwise
    (as OpenAI's strict function calling asks): a forced call names no argument the function lacks,
    and a small model cannot wander into inventing them."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("items", "anyOf", "oneOf", "allOf", "prefixItems"):  # schemas, or lists of them
        if key in out:
            out[key] = closed(out[key])
    for key in ("properties", "$defs", "definitions"):  # name -> schema
        if isinstance(out.get(key), dict):
            out[key] = {k: closed(v) for k, v in out[key].items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _literal(tokenizer, text: str) -> str:
    """A Lark literal for `text`: a special token by id where the vocabulary has it as one."""
    token = tokenizer.piece_to_id(text) if hasattr(tokenizer, "piece_to_id") else None
    if token is not None and token in getattr(tokenizer, "special_ids", ()):
        return f"<[{token}]>"
    return json.dumps(text)


def plan(req, tokenizer) -> ToolPlan | None:
    """The request's tool plan (None without tools or with tool_choice "none"); checks every field."""
    if not req.tools:
        if req.tool_choice not in (None, "none", "auto"):
            raise _bad("tool_choice needs tools: give the functions in tools", "tool_choice")
        return None
    tools = check_tools(req.tools)
    choice = check_choice(req.tool_choice, tools)
    if choice == "none":
        return None
    from ..tokenizer.chat import template_variables

    source = getattr(tokenizer, "chat_template", None)
    reads_tools = "tools" in template_variables(source)
    parallel = True if req.parallel_tool_calls is None else bool(req.parallel_tool_calls)
    return ToolPlan(tools, choice, parallel, family_of(source, reads_tools), reads_tools,
                    {t["function"]["name"] for t in tools})


def template_messages(req, tool_plan: ToolPlan | None) -> list[dict]:
    """The conversation as chat templates read it: HF's fields for tool calls and tool results; with
    the fallback prompt, earlier calls written as the Hermes text the prompt asks for."""
    in_template = tool_plan is None or tool_plan.in_template
    out = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        msg: dict[str, Any] = {"role": role, "content": m.text()}
        if m.name is not None:
            msg["name"] = m.name
        if role == "tool" and m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if role == "assistant" and m.tool_calls:
            calls = [_template_call(c, i) for i, c in enumerate(m.tool_calls)]
            if in_template:
                msg["tool_calls"] = calls
            else:
                text = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                               "arguments": c["function"]["arguments"]},
                                                              ensure_ascii=False) + "\n</tool_call>" for c in calls)
                msg["content"] = f"{msg['content']}\n{text}" if msg["content"] else text
        out.append(msg)
    return tool_plan.messages(out) if tool_plan is not None else out


def _template_call(call: Any, i: int) -> dict:
    """An assistant message's tool call for a template: arguments as an object (what HF templates expect)."""
    param = f"messages.tool_calls[{i}]"
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict) or not call["function"].get("name"):
        raise _bad(f"{param} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}", param)
    fn = call["function"]
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise _bad(f"{param}.function.arguments must be a JSON object (as a string)", param) from None
    return {"id": call.get("id") or _call_id(), "type": "function",
            "function": {"name": fn["name"], "arguments": args}}


# -- parsing ------------------------------------------------------------------------------------


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _as_call(obj: Any) -> dict | None:
    """{"name", "arguments" (a JSON string)} from a parsed call object, or None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}


def _json_values(text: str) -> list[Any] | None:
    """The JSON values that make up `text` (separated by whitespace or ';'), or None if it is not that."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content before the calls or None, [{"name", "arguments"}]) from text in any of the three formats.
    Text with no well-formed call is all content."""
    content = text
    calls: list[dict] = []
    if MARKERS[HERMES] in text:
        content = text[: text.index(MARKERS[HERMES])]
        for block in _HERMES_BLOCK.findall(text):
            values = _json_values(block) or []
            calls += [c for c in map(_as_call, values) if c]
    elif MARKERS[MISTRAL] in text:
        content, _, rest = text.partition(MARKERS[MISTRAL])
        if "[ARGS]" in rest:  # the newer form: [TOOL_CALLS]name[ARGS]{...} per call
            for part in rest.split(MARKERS[MISTRAL]):
                name, _, args = part.partition("[ARGS]")
                values = _json_values(args)
                if values and len(values) == 1:
                    call = _as_call({"name": name.strip(), "arguments": values[0]})
                    calls += [call] if call else []
        else:
            values = _json_values(rest) or []
            for v in values:
                calls += [c for c in map(_as_call, v if isinstance(v, list) else [v]) if c]
    else:
        head, marker, rest = text.partition(MARKERS[LLAMA3])
        body = rest if marker else text
        values = _json_values(body)
        if values:
            found = [_as_call(v) for v in values]
            if all(found) and (marker or all("parameters" in v or "arguments" in v for v in values)):
                content, calls = (head if marker else ""), found
    if not calls:
        return text, []
    return (content.strip() or None), calls


def openai_call(call: dict) -> dict:
    return {"id": _call_id(), "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}


class ToolStream:
    """One streamed choice of a request with tools: text in, OpenAI deltas out."""

    def __init__(self, tool_plan: ToolPlan):
        self.plan = tool_plan
        self.text = ""  # everything so far
        self.sent = 0  # characters of text sent as content
        self.calls_at: int | None = None  # where the calls begin
        self.calls_sent = 0

    def _hold(self) -> int:
        """How many characters at the end of the unsent text might begin a call marker."""
        tail = self.text[self.sent:]
        if self.plan.family == LLAMA3 and not self.text[: self.sent].strip() and tail.lstrip()[:1] in ("", "{"):
            return len(tail)  # a bare JSON call may be coming: hold it all
        for n in range(min(len(tail), max(map(len, MARKERS.values()))), 0, -1):
            if any(m.startswith(tail[-n:]) for m in MARKERS.values()):
                return n
        return 0

    def push(self, text: str) -> list[dict]:
        self.text += text
        deltas = []
        if self.calls_at is None:
            found = [self.text.find(m, self.sent) for m in MARKERS.values()]
            found = [i for i in found if i >= 0]
            end = min(found) if found else len(self.text) - self._hold()
            if end > self.sent:
                deltas.append({"content": self.text[self.sent: end]})
                self.sent = end
            if found:
                self.calls_at = end
        if self.calls_at is not None and self.plan.family == HERMES:
            closed = self.text[: self.text.rfind("</tool_call>") + len("</tool_call>")] if "</tool_call>" in self.text else ""
            deltas += self._calls(parse_tool_calls(closed[self.calls_at:])[1] if closed else [])
        return deltas

    def _calls(self, calls: list[dict]) -> list[dict]:
        if not self.plan.parallel:
            calls = calls[:1]
        deltas = []
        for call in calls[self.calls_sent:]:
            full = openai_call(call)
            index = self.calls_sent
            deltas.append({"tool_calls": [{"index": index, "id": full["id"], "type": "function",
                                           "function": {"name": call["name"], "arguments": ""}}]})
            args = call["arguments"]
            for i in range(0, len(args), ARGUMENT_FRAGMENT):
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": args[i: i + ARGUMENT_FRAGMENT]}}]})
            self.calls_sent += 1
        return deltas

    def finish(self) -> list[dict]:
        """The rest, at the end of the choice."""
        rest = self.text[self.sent:]
        content, calls = parse_tool_calls(rest)
        if not calls:
            return [{"content": rest}] if rest and self.calls_sent == 0 else []
        deltas = []
        if self.calls_sent == 0 and content and self.calls_at is None:
            deltas.append({"content": content})
        return deltas + self._calls(calls)

    @property
    def called(self) -> bool:
        return self.calls_sent > 0


def chat_message(tool_plan: ToolPlan | None, text: str, finish_reason: str) -> tuple[dict, str]:
    """A whole answer's assistant message and finish reason ("tool_calls" when it called tools)."""
    if tool_plan is not None:
        content, calls = tool_plan.parse(text)
        if calls:
            return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": text}, finish_reason
