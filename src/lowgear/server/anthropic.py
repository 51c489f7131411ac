"""Anthropic's Messages API, `POST /v1/messages`, as a translation layer over the OpenAI chat route.

A Messages request is validated here (Anthropic's names and ranges), translated into an OpenAI chat
completion body (system prompt, text, tools, tool_use and tool_result blocks, tool_choice) and run
through the app's own `/v1/chat/completions` in-process (an ASGI call with the translated body), always
as a stream. The OpenAI chunks that come back are turned into Anthropic's event sequence
(message_start, content_block_start, ping, content_block_delta, content_block_stop, message_delta,
message_stop); a non-streamed answer is those events folded into one message. So everything the chat
route does (validation, the context check, cancellation when the client goes away, tool calls) holds
here too, with no second copy. Errors are answered in Anthropic's shape,
{"type": "error", "error": {"type": "invalid_request_error", "message": ...}}.

Two facts come from the chat stream's extensions: the stop string that ended a choice (`stop_reason`,
as vLLM names it) gives `stop_sequence`, and the usage chunk (`stream_options.include_usage`) gives
the token counts, which therefore arrive in message_delta (message_start says 0 input tokens).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Annotated, Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from starlette.requests import ClientDisconnect

from .openai_types import format_validation_error

log = logging.getLogger("lowgear.server")
CHAT_PATH = "/v1/chat/completions"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
# the chat route's parameter names that differ here
PARAMS = {"stop": "stop_sequences", "max_completion_tokens": "max_tokens"}


class AnthropicError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message

    def body(self) -> dict:
        return {"type": "error", "error": {"type": ERROR_TYPES.get(self.status, "api_error"), "message": self.message}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# -- the request ---------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


BLOCK_TYPES = ("text", "tool_use", "tool_result")


def _blocks(value):
    """A string content is one text block; a block type this server cannot read is named as such."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if isinstance(value, list):
        for block in value:
            kind = block.get("type") if isinstance(block, dict) else None
            if isinstance(kind, str) and kind not in BLOCK_TYPES:
                raise ValueError(f"content blocks of type {kind!r} are not supported by this server "
                                 f"(it reads {', '.join(BLOCK_TYPES)})")
    return value


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: dict | None = None
    citations: list | None = None


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]
    cache_control: dict | None = None


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: Annotated[list[TextBlock], BeforeValidator(_blocks)] = []
    is_error: bool | None = None
    cache_control: dict | None = None

    def text(self) -> str:
        return _text(self.content)


Block = Annotated[Union[TextBlock, ToolUseBlock, ToolResultBlock], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: Annotated[list[Block], BeforeValidator(_blocks)]


class Tool(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict | None = None


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _name_for_tool(self):
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("name is required with type 'tool' and allowed only there")
        return self


class OutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Strict):
    format: OutputFormat | None = None
    effort: str | None = None  # accepted, no effect here


class MessagesRequest(_Strict):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: Annotated[list[TextBlock], BeforeValidator(_blocks)] = []
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None
    thinking: dict[str, Any] | None = None
    # accepted, no effect here
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None
    inference_geo: str | None = None
    speed: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.thinking and self.thinking.get("type") != "disabled":
            raise ValueError("thinking: extended thinking is not supported by this server")
        if self.messages[-1].role == "assistant":
            raise ValueError(f"messages.{len(self.messages) - 1}: a final assistant message (a prefill to continue) "
                             "is not supported by this server; end with a user message")
        return self


def _text(blocks: list[TextBlock]) -> str:
    return "".join(block.text for block in blocks)


def _bad(message: str) -> AnthropicError:
    return AnthropicError(400, message)


def parse_request(body: Any) -> MessagesRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    try:
        return MessagesRequest.model_validate(body)
    except Exception as exc:  # pydantic.ValidationError
        errors = exc.errors() if hasattr(exc, "errors") else [{"msg": str(exc)}]
        for err in errors:  # drop the block type pydantic puts after a block's index in the location
            loc = err.get("loc", ())
            err["loc"] = tuple(p for i, p in enumerate(loc) if not (p in BLOCK_TYPES and i and isinstance(loc[i - 1], int)))
        raise _bad(format_validation_error(errors)[0]) from None


def to_openai(req: MessagesRequest) -> dict:
    """The OpenAI chat completion body that asks the same of the model, always streamed."""
    messages: list[dict] = []
    if req.system:
        messages.append({"role": "system", "content": _text(req.system)})
    for i, m in enumerate(req.messages):
        wrong = ToolUseBlock if m.role == "user" else ToolResultBlock
        for j, block in enumerate(m.content):
            if isinstance(block, wrong):
                raise _bad(f"messages.{i}.content.{j}: a {block.type} block belongs in "
                           f"{'an assistant' if m.role == 'user' else 'a user'} message, not a {m.role} message")
        text = "".join(b.text for b in m.content if isinstance(b, TextBlock))
        if m.role == "user":
            results = [b for b in m.content if isinstance(b, ToolResultBlock)]
            messages += [{"role": "tool", "tool_call_id": r.tool_use_id, "content": r.text()} for r in results]
            if text or not results:
                messages.append({"role": "user", "content": text})
        else:
            calls = [{"id": b.id, "type": "function",
                      "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}}
                     for b in m.content if isinstance(b, ToolUseBlock)]
            messages.append({"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})})
    body: dict[str, Any] = {"model": req.model, "messages": messages, "max_tokens": req.max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}}
    for name in ("temperature", "top_p", "top_k"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    if req.stop_sequences:
        body["stop"] = req.stop_sequences
    # -- tools: OpenAI's function shape. The chat route answers these once it supports tool calls;
    # until then it refuses them and the refusal comes back here as a 400 naming `tools`.
    if req.tools:
        body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                           "parameters": t.input_schema}} for t in req.tools]
    if req.tool_choice is not None:
        c = req.tool_choice
        body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(c.type) or \
            {"type": "function", "function": {"name": c.name}}
        if c.disable_parallel_tool_use:
            body["parallel_tool_calls"] = False
    # -- structured output: OpenAI's response_format, answered (or refused) by the chat route as well
    if req.output_config is not None and req.output_config.format is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": req.output_config.format.schema_}}
    return body


# -- the answer ----------------------------------------------------------------------------------


def _event(kind: str, **data) -> tuple[str, dict]:
    return kind, {"type": kind, **data}


class EventTranslator:
    """OpenAI chat chunks in, Anthropic stream events out (one choice)."""

    def __init__(self, model: str, stop_sequences: list[str]):
        self.model = model
        self.stop_sequences = stop_sequences
        self.blocks = 0  # content blocks opened so far
        self.open: int | None = None  # the index of the open block
        self.tool_blocks: dict[int, int] = {}  # OpenAI tool call index -> block index
        self.finish: str | None = None
        self.stop_string: str | None = None
        self.usage = {"input_tokens": 0, "output_tokens": 0}
        self.done = False

    def start(self) -> list[tuple[str, dict]]:
        message = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None, "usage": dict(self.usage)}
        return [_event("message_start", message=message)]

    def _open(self, block: dict) -> list[tuple[str, dict]]:
        out = self._close()
        self.open, self.blocks = self.blocks, self.blocks + 1
        out.append(_event("content_block_start", index=self.open, content_block=block))
        if self.open == 0:
            out.append(_event("ping"))
        return out

    def _close(self) -> list[tuple[str, dict]]:
        if self.open is None:
            return []
        index, self.open = self.open, None
        return [_event("content_block_stop", index=index)]

    def chunk(self, chunk: dict) -> list[tuple[str, dict]]:
        out: list[tuple[str, dict]] = []
        if chunk.get("usage"):
            self.usage = {"input_tokens": chunk["usage"].get("prompt_tokens", 0),
                          "output_tokens": chunk["usage"].get("completion_tokens", 0)}
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self.open is None or self.open in self.tool_blocks.values():
                    out += self._open({"type": "text", "text": ""})
                out.append(_event("content_block_delta", index=self.open,
                                  delta={"type": "text_delta", "text": delta["content"]}))
            for call in delta.get("tool_calls") or []:
                fn = call.get("function") or {}
                if call.get("id") or call.get("index") not in self.tool_blocks:
                    out += self._open({"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
                                       "name": fn.get("name", ""), "input": {}})
                    self.tool_blocks[call.get("index", len(self.tool_blocks))] = self.open
                if fn.get("arguments"):
                    out.append(_event("content_block_delta", index=self.tool_blocks[call.get("index", 0)],
                                      delta={"type": "input_json_delta", "partial_json": fn["arguments"]}))
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
                self.stop_string = choice.get("stop_reason") if isinstance(choice.get("stop_reason"), str) else None
        return out

    def end(self) -> list[tuple[str, dict]]:
        out = self._open({"type": "text", "text": ""}) if self.blocks == 0 else []
        out += self._close()
        reason = STOP_REASONS.get(self.finish or "stop", "end_turn")
        stop = self.stop_string if self.stop_string in self.stop_sequences else None
        if stop is not None:
            reason = "stop_sequence"
        out.append(_event("message_delta", delta={"stop_reason": reason, "stop_sequence": stop}, usage=dict(self.usage)))
        out.append(_event("message_stop"))
        self.done = True
        return out


def fold(events: list[tuple[str, dict]]) -> dict:
    """The one message a stream of events describes (what a non-streamed request answers)."""
    message: dict = {}
    partial: dict[int, str] = {}
    for kind, data in events:
        if kind == "message_start":
            message = dict(data["message"], content=[])
        elif kind == "content_block_start":
            message["content"].append(dict(data["content_block"]))
        elif kind == "content_block_delta":
            block, delta = message["content"][data["index"]], data["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            else:
                partial[data["index"]] = partial.get(data["index"], "") + delta["partial_json"]
        elif kind == "content_block_stop" and data["index"] in partial:
            try:
                message["content"][data["index"]]["input"] = json.loads(partial[data["index"]] or "{}")
            except ValueError:
                message["content"][data["index"]]["input"] = {}
        elif kind == "message_delta":
            message.update(data["delta"])
            message["usage"] = dict(message["usage"], **data["usage"])
    return message


def _sse(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def _from_openai_error(status: int, body: bytes) -> AnthropicError:
    """The chat route's error (OpenAI's shape, or plain text) as Anthropic's, the parameter renamed."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    for ours, theirs in PARAMS.items():
        message = re.sub(rf"(^|; ){ours}(?=[:.])", rf"\g<1>{theirs}", message)
    return AnthropicError(status, message)


class _Translated(Response):
    """Runs the translated body through the app's chat route and answers in Anthropic's shape."""

    def __init__(self, openai_body: dict, req: MessagesRequest, headers: dict[str, str]):
        super().__init__()
        self.payload = json.dumps(openai_body).encode()
        self.req = req
        self.inner_headers = headers

    async def __call__(self, scope, receive, send):
        inner_scope = {k: scope[k] for k in ("type", "asgi", "http_version", "scheme", "server", "client",
                                              "root_path", "state") if k in scope}
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self.payload)).encode())]
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.inner_headers.items()]
        inner_scope.update(method="POST", path=CHAT_PATH, raw_path=CHAT_PATH.encode(), query_string=b"", headers=headers)
        body_sent = False

        async def inner_receive():
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": self.payload, "more_body": False}
            return await receive()  # the client's own channel: a disconnect reaches the chat route

        translator = EventTranslator(self.req.model, self.req.stop_sequences or [])
        state = {"status": 200, "started": False, "error_body": b"", "buffer": b"", "events": []}

        async def emit(events):
            if self.req.stream:
                if events:
                    await send({"type": "http.response.body", "body": b"".join(_sse(k, d) for k, d in events),
                                "more_body": True})
            else:
                state["events"] += events

        async def inner_send(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                if state["status"] == 200 and self.req.stream:
                    await send({"type": "http.response.start", "status": 200,
                                "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
                    state["started"] = True
                    await emit(translator.start())
                elif state["status"] == 200:
                    state["events"] += translator.start()
                return
            if message["type"] != "http.response.body":
                return
            if state["status"] != 200:
                state["error_body"] += message.get("body", b"")
                return
            state["buffer"] += message.get("body", b"")
            *complete, state["buffer"] = state["buffer"].split(b"\n\n")
            for raw in complete:
                await emit(self._translate(translator, raw))

        try:
            await scope["app"](inner_scope, inner_receive, inner_send)
        except (OSError, ClientDisconnect):  # the client went away (the chat route has cancelled its jobs)
            raise
        except Exception as exc:  # a bug behind the chat route: answered, not a broken connection
            log.exception("the chat route failed under /v1/messages")
            failure = AnthropicError(500, f"generation failed: {type(exc).__name__}: {exc}")
            if state["started"]:
                await send({"type": "http.response.body", "body": _sse("error", failure.body()), "more_body": False})
                return
            state["status"], state["error_body"] = 500, json.dumps({"error": {"message": failure.message}}).encode()
        if state["status"] != 200:
            err = _from_openai_error(state["status"], state["error_body"])
            await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
        elif self.req.stream:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif any(kind == "error" for kind, _ in state["events"]):
            failure = next(data for kind, data in state["events"] if kind == "error")
            await JSONResponse(failure, status_code=500)(scope, receive, send)
        else:
            await JSONResponse(fold(state["events"]))(scope, receive, send)

    def _translate(self, translator: EventTranslator, raw: bytes) -> list[tuple[str, dict]]:
        data = b"".join(line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:"))
        if not data or translator.done:
            return []
        if data == b"[DONE]":
            return translator.end()
        chunk = json.loads(data)
        if "error" in chunk:  # the generation failed midway: Anthropic's error event ends the stream
            translator.done = True
            err = _from_openai_error(500, data)
            return [("error", err.body())]
        return translator.chunk(chunk)


def add_routes(app: FastAPI) -> None:
    app.add_api_route("/v1/messages", create_message, methods=["POST"])


async def create_message(request: Request):
    try:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            raise _bad("the request body is not valid JSON") from None
        req = parse_request(body)
        openai_body = to_openai(req)
    except AnthropicError as err:
        return err.response()
    headers = {}
    auth = request.headers.get("authorization") or (
        f"Bearer {request.headers['x-api-key']}" if "x-api-key" in request.headers else None)
    if auth:
        headers["authorization"] = auth
    return _Translated(openai_body, req, headers)
