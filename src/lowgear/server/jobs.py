"""A request's jobs: submitting one per choice, waiting for whole answers, and streaming them as
server-sent events in OpenAI's chunk shapes (chat and text completions). However a response ends
(finished, client gone, server error) its jobs are cancelled, which frees their pages.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..errors import ContextLengthError, LowgearError
from . import logprobs as lp
from . import tools
from .engine import Engine, Event, JobHandle
from .openai_types import APIError, SamplingSpec

DISCONNECT_POLL_S = 0.5


class _Jobs:
    """The jobs of one request (n per prompt) and the queue their events arrive on."""

    def __init__(self, sink: asyncio.Queue, n: int):
        self.sink = sink
        self.n = n
        self.handles: list[JobHandle] = []

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()


async def _start_jobs(engine: Engine, prompts: list[tuple[list[int], SamplingSpec]], n: int) -> _Jobs:
    """Submit one job per choice; if any is refused, cancel the others and answer the refusal.

    With a seed, choice i samples with seed + i, so the n choices differ and each reproduces.
    """
    jobs = _Jobs(asyncio.Queue(), n)
    try:
        for i, (ids, spec) in enumerate(prompts):
            if spec.seed is not None:
                spec = replace(spec, seed=spec.seed + i % n)
            jobs.handles.append(await engine.submit(ids, spec, index=i, sink=jobs.sink))
    except ContextLengthError as exc:
        jobs.cancel()
        raise APIError(400, str(exc), param="max_tokens", code="context_length_exceeded")
    except LowgearError as exc:
        jobs.cancel()
        raise APIError(400, str(exc), code="invalid_value")
    except RuntimeError as exc:
        jobs.cancel()
        raise APIError(503, str(exc), type="server_error", code="unavailable")
    except BaseException:
        jobs.cancel()
        raise
    return jobs


def _usage(jobs: _Jobs, last: dict[int, Event]) -> dict:
    # the n choices of one prompt count its tokens once, as OpenAI does
    prompt = sum(h.prompt_tokens for h in jobs.handles if h.index % jobs.n == 0)
    completion = sum(ev.completion_tokens for ev in last.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _server_error(ev: Event) -> APIError:
    if isinstance(ev.error, APIError):  # a failure of the request's own making (its grammar)
        return ev.error
    return APIError(500, f"generation failed: {ev.error or ev.finish_reason}", type="server_error",
                    code="generation_failed")


async def _collect(request: Request, jobs: _Jobs) -> tuple[list[str], list[str], dict, list[list]]:
    """Wait for every choice to finish; cancel everything if the client goes away meanwhile."""
    n = len(jobs.handles)
    texts = [[] for _ in range(n)]
    logprobs = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    last: dict[int, Event] = {}
    pending = n
    try:
        next_check = time.monotonic() + DISCONNECT_POLL_S
        while pending:
            timeout = max(0.0, next_check - time.monotonic())
            try:
                ev = await asyncio.wait_for(jobs.sink.get(), timeout=timeout)
            except asyncio.TimeoutError:
                ev = None
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    raise APIError(499, "client closed the request", code="client_closed")
            if ev is None:
                continue
            texts[ev.index].append(ev.text)
            logprobs[ev.index].extend(ev.logprobs)
            if ev.done:
                if ev.finish_reason in ("error", "cancelled"):
                    raise _server_error(ev)
                reasons[ev.index] = ev.finish_reason
                last[ev.index] = ev
                pending -= 1
    finally:
        jobs.cancel()
    return ["".join(t) for t in texts], reasons, _usage(jobs, last), logprobs


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _events(jobs: _Jobs) -> AsyncIterator[Event]:
    pending = len(jobs.handles)
    while pending:
        ev = await jobs.sink.get()
        if ev.done:
            pending -= 1
        yield ev


async def _chat_stream(jobs: _Jobs, rid: str, created: int, engine: Engine, include_usage: bool,
                       tool_plan: "tools.ToolPlan | None" = None):
    model = engine.model_name
    shapers = {h.index: tools.ToolStream(tool_plan) for h in jobs.handles} if tool_plan is not None else {}

    def chunk(choices: list[dict]) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": None, "choices": choices}
        if include_usage:
            body["usage"] = None
        return _sse(body)

    for h in jobs.handles:
        yield chunk([{"index": h.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    last: dict[int, Event] = {}
    async for ev in _events(jobs):
        if ev.done and ev.finish_reason in ("error", "cancelled"):
            yield _sse(_server_error(ev).body())
            return
        shaper = shapers.get(ev.index)
        deltas = ([{"content": ev.text}] if ev.text else []) if shaper is None else shaper.push(ev.text)
        if ev.done and shaper is not None:
            deltas += shaper.finish()
        logprobs = {"content": lp.chat_content(engine.tokenizer, ev.logprobs)} if ev.logprobs else None
        if logprobs and not deltas:
            deltas = [{}]
        for delta in deltas:
            yield chunk([{"index": ev.index, "delta": delta, "logprobs": logprobs, "finish_reason": None}])
            logprobs = None
        if ev.done:
            last[ev.index] = ev
            reason = "tool_calls" if shaper is not None and shaper.called else ev.finish_reason
            yield chunk([{"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": reason,
                          "stop_reason": ev.stop_reason}])
    if include_usage:
        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": None, "choices": [], "usage": _usage(jobs, last)})
    yield "data: [DONE]\n\n"


async def _completion_stream(jobs: _Jobs, rid: str, created: int, engine: Engine, include_usage: bool,
                             echoes: list[str] | None):
    model = engine.model_name
    offsets: dict[int, int] = {}  # each choice's text_offset so far

    def chunk(index: int, text: str, finish: str | None, entries: list = ()) -> str:
        logprobs = None
        if entries:
            logprobs, offsets[index] = lp.completion_lists(engine.tokenizer, entries, offsets.get(index, 0))
        body = {"id": rid, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": None,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return _sse(body)

    if echoes:
        for h in jobs.handles:
            yield chunk(h.index, echoes[h.index], None)
    last: dict[int, Event] = {}
    async for ev in _events(jobs):
        if ev.done and ev.finish_reason in ("error", "cancelled"):
            yield _sse(_server_error(ev).body())
            return
        if ev.text or ev.done or ev.logprobs:
            last.update({ev.index: ev} if ev.done else {})
            yield chunk(ev.index, ev.text, ev.finish_reason if ev.done else None, ev.logprobs)
    if include_usage:
        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                    "system_fingerprint": None, "choices": [], "usage": _usage(jobs, last)})
    yield "data: [DONE]\n\n"


class _JobsResponse(StreamingResponse):
    """An SSE stream that cancels its jobs however it ends, so a vanished client frees its pages."""

    def __init__(self, jobs: _Jobs, content):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._jobs = jobs

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._jobs.cancel()
