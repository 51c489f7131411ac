"""The FastAPI app: OpenAI-shaped endpoints over one `Engine`, plus /health, /metrics and the chat page.

A request is validated (openai_types), tokenized here, checked against the context, and submitted as
one job per choice; the endpoint waits until the generator has accepted every job, so refusals are
plain 4xx answers, never a broken stream. Streaming answers are server-sent events in OpenAI's chunk
shapes. Whatever way a response ends (finished, client gone, server error) its jobs are cancelled,
which frees their pages: `_JobsResponse` guarantees that for streams, `_collect` for whole answers
(both in server/jobs.py, with the stream shapes).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from dataclasses import replace
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextLengthError, LowgearError
from . import anthropic, metrics, structured, tools
from . import logprobs as lp
from .engine import Engine
from .jobs import _chat_stream, _collect, _completion_stream, _JobsResponse, _start_jobs
from .openai_types import (APIError, ChatCompletionRequest, CompletionRequest, SamplingSpec, find_lone_surrogate,
                           format_validation_error, sampling_spec)

log = logging.getLogger("lowgear.server")


def _error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def create_app(engine: Engine, *, api_key: str | None = None, allow_any_model: bool = False,
               model_names: tuple[str, ...] = (), router_metrics=()) -> FastAPI:
    """`model_names`: names a request's `model` may give besides engine.model_name; `allow_any_model`
    accepts any name (as llama-server does), else an unknown one is a 404 `model_not_found`;
    `router_metrics`: (kind, name) pairs renaming the gateway gauges of /metrics (metrics.router_names)."""
    app = FastAPI(title="lowgear", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.engine = engine
    app.state.router_metrics = metrics.router_names(router_metrics)
    known = tuple(dict.fromkeys((engine.model_name, *model_names)))
    gate = _Gate(api_key, None if allow_any_model else known)
    gate.known = known
    _add_error_handlers(app)
    _add_plain_routes(app, engine, gate)
    _add_generation_routes(app, engine, gate)
    anthropic.add_routes(app)  # /v1/messages: Anthropic's API over the chat route
    _document_request_bodies(app)
    return app


def _document_request_bodies(app: FastAPI) -> None:
    """/openapi.json with the generation endpoints' bodies (the routes parse them themselves, so
    FastAPI alone would list no body): what clients and schema-driven fuzzers (Schemathesis) read."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in (("/v1/chat/completions", ChatCompletionRequest), ("/v1/completions", CompletionRequest),
                            ("/v1/messages", anthropic.MessagesRequest)):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
            }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answered in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error_response(APIError(400, "the request body is not valid JSON", code="invalid_json"))
        message, param = format_validation_error(errors)
        return _error_response(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(ContextLengthError)
    async def _context_error(request: Request, exc: ContextLengthError):
        return _error_response(APIError(400, str(exc), param="messages", code="context_length_exceeded"))

    @app.exception_handler(LowgearError)
    async def _lowgear_error(request: Request, exc: LowgearError):
        return _error_response(APIError(400, str(exc), code="invalid_value"))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        # a bug: logged with its traceback by the server, answered in OpenAI's shape, never as plain text
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(APIError(500, f"internal server error ({type(exc).__name__}); see the server log",
                                        type="server_error", code="internal_error"))


class _Gate:
    """The API key check and the request body's parse into a validated model."""

    def __init__(self, api_key: str | None, model_names: tuple[str, ...] | None = None):
        self.api_key = api_key
        self.model_names = model_names  # None: any name is accepted
        self.known: tuple[str, ...] = model_names or ()

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    async def parse(self, request: Request, model_cls):
        self.check_key(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON", code="invalid_json")
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        bad = find_lone_surrogate(body)
        if bad is not None:
            raise APIError(400, f"{bad} holds a lone UTF-16 surrogate (such as \\ud800), which is not Unicode text; "
                                "send valid UTF-8 / paired surrogates", param=bad, code="invalid_value")
        try:
            req = model_cls.model_validate(body)
        except Exception as exc:  # pydantic.ValidationError
            errors = exc.errors() if hasattr(exc, "errors") else [{"msg": str(exc)}]
            message, param = format_validation_error(errors)
            raise APIError(400, message, param=param, code="invalid_value")
        if self.model_names is not None and req.model not in self.model_names:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves "
                                f"{', '.join(repr(n) for n in self.model_names)} (start it with --allow-any-model to "
                                "accept any name).", param="model", code="model_not_found")
        return req


def _add_plain_routes(app: FastAPI, engine: Engine, gate: _Gate) -> None:
    """/health, /metrics, /v1/models and the chat page."""
    created = int(time.time())

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "error", "message": "the generator loop is not running",
                                 "last_error": engine.last_error}, status_code=503)
        return {"status": "ok", "model": engine.model_name}

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(engine.stats(), engine.model_name, app.state.router_metrics),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": engine.model_name, "object": "model", "created": created, "owned_by": "lowgear",
                "max_model_len": engine.max_seq_len}

    @app.get("/v1/models")
    async def list_models(request: Request):
        gate.check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        gate.check_key(request)
        if model_id not in gate.known:
            raise APIError(404, f"The model '{model_id}' does not exist; this server serves '{engine.model_name}'.",
                           param="model", code="model_not_found")
        return model_card()

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(resources.files("lowgear.server").joinpath("static/index.html").read_text("utf-8"))


def _add_generation_routes(app: FastAPI, engine: Engine, gate: _Gate) -> None:
    """/v1/chat/completions and /v1/completions."""
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await gate.parse(request, ChatCompletionRequest)
        tool_plan = tools.plan(req, engine.tokenizer)
        try:
            text = engine.tokenizer.apply_chat_template(tools.template_messages(req, tool_plan), add_generation_prompt=True,
                                                        **(tool_plan.template_variables() if tool_plan else {}))
        except (LowgearError, APIError):
            raise
        except Exception as exc:
            raise APIError(400, f"the messages do not fit the model's chat template: {exc}", param="messages")
        ids = _encode(engine, text, special=True)
        limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        spec = _spec_for(engine, req, len(ids), req.token_limit, limit_param, "messages")
        if tool_plan is not None:
            spec = _with_tools(engine, spec, tool_plan)
        jobs = await _start_jobs(engine, [(ids, spec)] * req.n, req.n)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return _JobsResponse(jobs, _chat_stream(jobs, rid, now, engine, req.include_usage, tool_plan))
        texts, reasons, usage, logprobs = await _collect(request, jobs)
        choices = []
        for i in range(len(jobs.handles)):
            message, reason = tools.chat_message(tool_plan, texts[i], reasons[i])
            choices.append({"index": i, "message": message, "finish_reason": reason,
                            "logprobs": {"content": lp.chat_content(engine.tokenizer, logprobs[i])}
                            if spec.logprobs is not None else None})
        return {"id": rid, "object": "chat.completion", "created": now, "model": engine.model_name,
                "choices": choices, "usage": usage, "system_fingerprint": None}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await gate.parse(request, CompletionRequest)
        prompts = req.prompts()
        encoded = [p if isinstance(p, list) else _encode(engine, p, special=False) for p in prompts]
        vocab = _vocab_size(engine)
        for p in encoded:
            if vocab and any(t < 0 or t >= vocab for t in p):
                raise APIError(400, f"token ids in prompt must be in [0, {vocab})", param="prompt")
        specs = [_spec_for(engine, req, len(ids), req.token_limit, "max_tokens", "prompt") for ids in encoded]
        # choice index = prompt index * n + sample index, as OpenAI numbers them
        jobs = await _start_jobs(engine, [(ids, spec) for ids, spec in zip(encoded, specs) for _ in range(req.n)],
                                 req.n)
        echoes = None
        if req.echo:
            echoes = [p if isinstance(p, str) else engine.tokenizer.decode(_ids_tensor(p)) for p in prompts]
            echoes = [e for e in echoes for _ in range(req.n)]
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return _JobsResponse(jobs, _completion_stream(jobs, rid, now, engine, req.include_usage, echoes))
        texts, reasons, usage, logprobs = await _collect(request, jobs)
        choices = [{"index": i, "text": (echoes[i] if echoes else "") + texts[i],
                    "logprobs": lp.completion_lists(engine.tokenizer, logprobs[i])[0] if req.logprobs is not None
                    else None, "finish_reason": reasons[i]} for i in range(len(jobs.handles))]
        return {"id": rid, "object": "text_completion", "created": now, "model": engine.model_name,
                "choices": choices, "usage": usage, "system_fingerprint": None}


# -- helpers ------------------------------------------------------------------------------------


def _ids_tensor(ids: list[int]):
    import torch

    return torch.tensor([ids], dtype=torch.long)


def _vocab_size(engine: Engine) -> int | None:
    tok = engine.tokenizer
    for name in ("vocab_size", "get_vocab_size"):
        v = getattr(tok, name, None)
        if callable(v):
            v = v()
        if isinstance(v, int):
            return v
    return None


def _encode(engine: Engine, text: str, *, special: bool) -> list[int]:
    """Chat prompts come from the template, which writes its own special tokens (BOS included);
    plain prompts get the model's default BOS, as the Python API's generate() with add_bos=that."""
    add_bos = False if special else _default_add_bos(engine)
    ids = engine.tokenizer.encode(text, add_bos=add_bos, encode_special_tokens=special)
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    if not ids:
        raise APIError(400, "the prompt is empty after tokenization", param="prompt")
    return [int(t) for t in ids]


def _default_add_bos(engine: Engine) -> bool:
    return bool(getattr(engine.tokenizer, "add_bos_default", False))


def _spec_for(engine: Engine, req, prompt_len: int, limit: int | None, limit_param: str,
              prompt_param: str) -> SamplingSpec:
    ctx = engine.max_seq_len
    if prompt_len >= ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your {prompt_param} "
                            f"has {prompt_len} tokens, which leaves no room for a completion. Please shorten it.",
                       param=prompt_param, code="context_length_exceeded")
    if limit is None:
        limit = ctx - prompt_len
    elif prompt_len + limit > ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{prompt_len + limit} tokens ({prompt_len} in the {prompt_param}, {limit} in the "
                            f"completion). Please reduce the length of the {prompt_param} or {limit_param}.",
                       param=limit_param, code="context_length_exceeded")
    return replace(sampling_spec(req, limit), grammar=structured.request_grammar(engine.tokenizer, req))


def _with_tools(engine: Engine, spec: SamplingSpec, tool_plan: "tools.ToolPlan") -> SamplingSpec:
    """A forced tool call's grammar (a request cannot force both a call and a response format)."""
    grammar = tool_plan.grammar(engine.tokenizer)
    if grammar is not None and spec.grammar is not None:
        raise APIError(400, "tool_choice forces a tool call, which cannot be combined with a response format "
                            "(response_format / guided_* / structured_outputs)", param="tool_choice",
                       code="invalid_value")
    return replace(spec, grammar=grammar or spec.grammar, decode_special_tokens=tool_plan.decode_special_tokens)
