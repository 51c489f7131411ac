"""The bridge between HTTP requests and the one DynamicGenerator: a background loop owns it.

The generator is not thread-safe, so exactly one thread touches it. That thread drains a submission
queue (enqueue a job, cancel a job, stop) between `iterate()` calls, runs one step, and routes each
result to the asyncio queue of the request that owns the job (via `loop.call_soon_threadsafe`).
Every HTTP client's request is one or more jobs in the same batch: continuous batching across clients.

Counters for /metrics (queue length, running jobs, pages, tokens/s) are snapshotted by the same
thread after each step, so readers never call into the generator.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .openai_types import SamplingSpec

log = logging.getLogger("lowgear.server")

FINISH_REASONS = {"stop_token": "stop", "stop_string": "stop", "eos": "stop", "max_new_tokens": "length",
                  "cancelled": "cancelled"}
RATE_WINDOW_S = 10.0


@dataclass
class Event:
    """One step's news for one choice of a request."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    done: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" when done
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None
    stop_reason: str | None = None  # the stop string that ended the choice (vLLM's `stop_reason`)
    logprobs: list = field(default_factory=list)  # (token, logprob, [(id, logprob)] best first) per token


class JobHandle:
    """One choice of one request: its generator job, where its events go, and how to cancel it."""

    _ids = itertools.count(1)

    def __init__(self, engine: "Engine", job: Any, index: int, sink: asyncio.Queue, loop: asyncio.AbstractEventLoop,
                 prompt_tokens: int):
        self.id = next(self._ids)
        self.engine = engine
        self.job = job
        self.index = index
        self.sink = sink
        self.loop = loop
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finished = False
        self.accepted: asyncio.Future = loop.create_future()

    def post(self, event: Event) -> None:
        """Called from the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.sink.put_nowait, event)
        except RuntimeError:  # the request's loop is gone (server shutting down)
            pass

    def settle(self, error: BaseException | None) -> None:
        """Called from the worker thread once the generator has accepted or refused the job."""

        def _set():
            if not self.accepted.done():
                if error is None:
                    self.accepted.set_result(True)
                else:
                    self.accepted.set_exception(error)

        try:
            self.loop.call_soon_threadsafe(_set)
        except RuntimeError:
            pass

    def cancel(self) -> None:
        if not self.finished:
            self.engine._submit(("cancel", self))


def lowgear_job_factory(tokenizer) -> Callable[[list[int], SamplingSpec, Any], Any]:
    """Build lowgear DynamicJobs from token ids and a SamplingSpec."""
    import torch

    import lowgear as lg

    stop_tokens = sorted(getattr(tokenizer, "stop_token_ids", None) or [])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos not in stop_tokens:
        stop_tokens.append(eos)

    def make(input_ids: list[int], spec: SamplingSpec, identifier: Any):
        settings = sampler_settings(spec)
        constraint = None
        if spec.grammar is not None:
            from .structured import GrammarConstraint

            constraint = GrammarConstraint(tokenizer, spec.grammar)
        return lg.DynamicJob(
            input_ids=torch.tensor([input_ids], dtype=torch.long),
            max_new_tokens=spec.max_tokens,
            gen_settings=settings,
            stop_conditions=([] if spec.ignore_eos else stop_tokens) + list(spec.stop),
            min_new_tokens=spec.min_tokens,
            seed=spec.seed,
            identifier=identifier,
            decode_special_tokens=spec.decode_special_tokens,
            logprobs=spec.logprobs,
            constraint=constraint,
        )

    return make


def sampler_settings(spec: SamplingSpec):
    """lowgear sampler settings for a request (temperature 0 is greedy there too, as in OpenAI's API)."""
    import lowgear as lg

    settings = lg.Sampler.Settings(
        temperature=spec.temperature,
        top_k=spec.top_k,
        top_p=spec.top_p,
        min_p=spec.min_p,
        token_presence_penalty=spec.presence_penalty,
        token_frequency_penalty=spec.frequency_penalty,
    )
    settings.validate()
    return settings


class Engine:
    """Owns the generator's thread. `submit` from any asyncio loop; `stats` from anywhere."""

    def __init__(self, generator: Any, tokenizer: Any, *, model_name: str, max_seq_len: int,
                 job_factory: Callable[[list[int], SamplingSpec, Any], Any] | None = None):
        self.generator = generator
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_seq_len = max_seq_len
        self._job_factory = job_factory
        self._inbox: queue.Queue = queue.Queue()
        self._active: dict[int, JobHandle] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._started_at = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()  # guards the counters below, read by /metrics
        self._counters = {"prompt_tokens_total": 0, "generated_tokens_total": 0, "requests_finished_total": 0,
                          "requests_cancelled_total": 0, "requests_failed_total": 0, "steps_total": 0}
        self._snapshot: dict[str, float] = {"queued": 0, "running": 0, "pages_in_use": 0, "pages_total": 0}
        self.last_error: str | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            if self._job_factory is None:
                self._job_factory = lowgear_job_factory(self.tokenizer)
            self._thread = threading.Thread(target=self._run, name="lowgear-generator", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._inbox.put(("stop", None))
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the asyncio side ---------------------------------------------------------------------

    def _submit(self, item) -> None:
        self._inbox.put(item)

    async def submit(self, input_ids: list[int], spec: SamplingSpec, *, index: int, sink: asyncio.Queue) -> JobHandle:
        """Enqueue one job; returns once the generator has accepted it, raises what it raised otherwise."""
        if not self.alive:
            raise RuntimeError("the generator loop is not running")
        loop = asyncio.get_running_loop()
        handle = JobHandle(self, None, index, sink, loop, prompt_tokens=len(input_ids))
        handle.job = self._job_factory(input_ids, spec, handle.id)
        self._submit(("enqueue", handle))
        try:
            await asyncio.shield(handle.accepted)
        except asyncio.CancelledError:
            handle.cancel()
            raise
        return handle

    def stats(self) -> dict[str, float]:
        """A consistent snapshot for /metrics and /health."""
        with self._lock:
            out = dict(self._snapshot)
            out.update(self._counters)
            out["tokens_per_second"] = self._rate_locked(time.monotonic())
        out["queued"] = out.get("queued", 0) + self._inbox.qsize()
        return out

    # -- the worker thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            idle = not self._active and not self._generator_busy()
            if not self._drain(block=idle):
                break
            if not self._active and not self._generator_busy():
                self._take_snapshot()
                continue
            try:
                results = self.generator.iterate()
            except Exception as exc:  # a bug or an OOM in one step: fail the running jobs, keep serving
                log.exception("generator step failed")
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._fail_all(exc)
                continue
            now = time.monotonic()
            new_tokens = 0
            for result in results:
                new_tokens += self._route(result)
            with self._lock:
                self._counters["steps_total"] += 1
                self._counters["generated_tokens_total"] += new_tokens
                self._samples.append((now, new_tokens))
            self._take_snapshot()
        self._fail_all(RuntimeError("the server is shutting down"), finish_reason="cancelled")

    def _generator_busy(self) -> bool:
        try:
            return self.generator.num_remaining_jobs() > 0
        except Exception:
            return False

    def _drain(self, block: bool) -> bool:
        """Apply every pending submission; False when told to stop."""
        while True:
            try:
                kind, handle = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                self._stopping = True
                return False
            if kind == "enqueue":
                self._enqueue(handle)
            elif kind == "cancel":
                self._cancel(handle)

    def _enqueue(self, handle: JobHandle) -> None:
        try:
            self.generator.enqueue(handle.job)
        except Exception as exc:
            handle.finished = True
            handle.settle(exc)
            return
        self._active[handle.id] = handle
        with self._lock:
            self._counters["prompt_tokens_total"] += handle.prompt_tokens
        handle.settle(None)

    def _cancel(self, handle: JobHandle) -> None:
        if self._active.pop(handle.id, None) is None:
            return
        try:
            self.generator.cancel(handle.job)
        except Exception:
            log.exception("cancelling a job failed")
        handle.finished = True
        with self._lock:
            self._counters["requests_cancelled_total"] += 1
        handle.post(Event(index=handle.index, done=True, finish_reason="cancelled",
                          prompt_tokens=handle.prompt_tokens, completion_tokens=handle.completion_tokens))

    def _route(self, result: dict) -> int:
        """Send one result to its request; returns how many new tokens it carried."""
        token_ids = list(result.get("token_ids") or [])
        handle = self._active.get(result.get("identifier"))
        if handle is None:  # cancelled since, or not ours
            return len(token_ids)
        handle.completion_tokens += len(token_ids)
        if result.get("prompt_tokens"):
            handle.prompt_tokens = int(result["prompt_tokens"])
        event = Event(index=handle.index, text=result.get("text") or "", token_ids=token_ids,
                      prompt_tokens=handle.prompt_tokens, completion_tokens=handle.completion_tokens,
                      logprobs=list(result.get("logprobs") or ()))
        if result.get("eos"):
            reason = result.get("eos_reason") or "stop_token"
            event.done = True
            event.finish_reason = FINISH_REASONS.get(reason, "stop")
            event.stop_reason = result.get("stop_string")
            if reason == "error":  # this job alone failed (e.g. fp16 overflow): say why, the others go on
                from ..errors import LowgearError

                event.finish_reason, event.error = "error", LowgearError(result.get("error") or "generation failed")
                if result.get("grammar_error"):  # the request's own grammar, not the server: a 4xx
                    from .openai_types import APIError

                    event.error = APIError(422, f"structured output stopped: {result.get('error')}; the format "
                                                "constraint left no token to continue with", code="grammar_dead_end")
            if result.get("new_tokens") is not None:
                event.completion_tokens = handle.completion_tokens = int(result["new_tokens"])
            handle.finished = True
            self._active.pop(handle.id, None)
            with self._lock:
                key = "requests_cancelled_total" if event.finish_reason == "cancelled" else "requests_finished_total"
                self._counters[key] += 1
        handle.post(event)
        return len(token_ids)

    def _fail_all(self, exc: BaseException, finish_reason: str = "error") -> None:
        for handle in list(self._active.values()):
            try:
                self.generator.cancel(handle.job)
            except Exception:
                pass
            handle.finished = True
            handle.post(Event(index=handle.index, done=True, finish_reason=finish_reason, error=exc,
                              prompt_tokens=handle.prompt_tokens, completion_tokens=handle.completion_tokens))
            with self._lock:
                self._counters["requests_failed_total"] += 1
        self._active.clear()
        self._take_snapshot()

    def _take_snapshot(self) -> None:
        try:
            stats = dict(self.generator.stats())
        except Exception:
            stats = {}
        snap = {
            "queued": stats.get("queued", 0),
            "running": stats.get("running", len(self._active)),
            "pages_in_use": stats.get("pages_in_use", 0),
            "pages_total": stats.get("pages_total", 0),
            "spec_proposed_total": stats.get("spec_proposed", 0),
            "spec_accepted_total": stats.get("spec_accepted", 0),
            "active_requests": len(self._active),
        }
        with self._lock:
            self._snapshot = snap

    def _rate_locked(self, now: float) -> float:
        while self._samples and now - self._samples[0][0] > RATE_WINDOW_S:
            self._samples.popleft()
        window = min(RATE_WINDOW_S, max(now - self._started_at, 1.0))
        return sum(n for _, n in self._samples) / window
