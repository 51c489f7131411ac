"""lowgear serve: the OpenAI-compatible server.

Two halves. The first drives the app and the engine bridge over a fake generator that obeys the
DynamicGenerator contract (fast: shapes, validation, auth, cancellation, errors). The second starts a
real `lowgear serve` process on loopback with the embedded SmolLM2 model and drives it with the
official openai client, comparing greedy output with the Python API's.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import openai
import pytest
import uvicorn

from lowgear.errors import ContextLengthError
from lowgear.server import metrics
from lowgear.server.app import create_app
from lowgear.server.engine import Engine

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


# ---------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(base: str, path: str, body: dict | None = None, headers: dict | None = None, raw: bytes | None = None):
    """(status, parsed JSON or text) of one plain request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def get_metrics(base: str) -> dict[str, float]:
    status, text = http(base, "/metrics")
    assert status == 200
    return metrics.parse(text)


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def open_stream(port: int, path: str, body: dict, wanted_events: int = 2) -> tuple[socket.socket, bytes]:
    """Start a streaming request on a raw socket and read until `wanted_events` SSE events arrived."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
    )
    got = b""
    while got.count(b"data:") < wanted_events:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return sock, got


class ThreadServer:
    """uvicorn serving an app in a thread of this process, on a free loopback port."""

    def __init__(self, app):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        assert wait_until(lambda: self.server.started, timeout=20), "uvicorn did not start"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def start_model_server(*args: str, timeout: float = 240.0):
    """A real `lowgear serve` process with the embedded model on a free loopback port: (process, base URL)."""
    import lowgear

    port = free_port()
    env = user_env()
    cmd = [sys.executable, "-c", "import sys, lowgear.server as s; sys.exit(s.main(sys.argv[1:]))",
           "--model", lowgear.default_model_path(), "--port", str(port), "--log-level", "warning", "--allow-any-model",
           *args]
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"lowgear-serve-{port}.log"), "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"lowgear serve exited with {proc.returncode}:\n{log.read()}")
        try:
            if http(base, "/health")[0] == 200:
                return proc, base
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    log.seek(0)
    raise RuntimeError(f"lowgear serve did not become healthy in {timeout}s:\n{log.read()}")


def user_env() -> dict:
    """The environment a user's shell would have: conftest's TRITON_INTERPRET (for kernel tests) removed,
    so the server runs the CPU paths a user gets, not Triton's interpreter."""
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    return env


def stop_model_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# ---------------------------------------------------------------------- a fake generator


class FakeTokenizer:
    """Words are tokens: enough to count prompt tokens and render a chat."""

    add_bos_default = False
    stop_token_ids = {0}
    eos_token_id = 0
    vocab_size = 1000

    def encode(self, text, add_bos=False, encode_special_tokens=False):
        return [1 + (hash(w) % 900) for w in text.split()] or [1]

    def decode(self, ids, decode_special_tokens=False):
        return " ".join(f"t{int(i)}" for i in ids.reshape(-1).tolist())

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class FakeJob:
    def __init__(self, input_ids, spec, identifier):
        self.input_ids, self.spec, self.identifier = input_ids, spec, identifier
        seed = spec.seed if spec.seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(seed)
        self.generated, self.text = 0, ""


WORDS = ["alpha ", "beta ", "gamma ", "delta ", "STOP ", "epsilon "]


class FakeGenerator:
    """Obeys the DynamicGenerator contract: one word per job and step, one page per running job."""

    def __init__(self, step_s: float = 0.0, pages_total: int = 8, capacity: int = 64, fail_on_step: int | None = None):
        self.step_s, self.pages_total, self.capacity = step_s, pages_total, capacity
        self.queue, self.running, self.cancelled = [], [], []
        self.steps, self.fail_on_step = 0, fail_on_step
        self.thread_ids = set()

    def enqueue(self, job):
        self.thread_ids.add(threading.get_ident())
        if len(job.input_ids) + job.spec.max_tokens > self.capacity:
            raise ContextLengthError(f"{len(job.input_ids)} + {job.spec.max_tokens} tokens exceed {self.capacity}")
        self.queue.append(job)

    def cancel(self, job):
        self.thread_ids.add(threading.get_ident())
        for lst in (self.queue, self.running):
            if job in lst:
                lst.remove(job)
                self.cancelled.append(job)

    def num_remaining_jobs(self):
        return len(self.queue) + len(self.running)

    def stats(self):
        return {"queued": len(self.queue), "running": len(self.running), "pages_in_use": len(self.running),
                "pages_total": self.pages_total}

    def iterate(self):
        self.thread_ids.add(threading.get_ident())
        self.steps += 1
        if self.fail_on_step is not None and self.steps == self.fail_on_step:
            raise RuntimeError("simulated step failure")
        while self.queue and len(self.running) < self.pages_total:
            self.running.append(self.queue.pop(0))
        if self.step_s:
            time.sleep(self.step_s)
        results = []
        for job in list(self.running):
            greedy = job.spec.temperature == 0
            word = WORDS[job.generated % 4] if greedy else job.rng.choice(WORDS)
            job.generated += 1
            job.text += word
            result = {"job": job, "identifier": job.identifier, "stage": "streaming", "text": word,
                      "token_ids": [7], "eos": False, "new_tokens": job.generated, "prompt_tokens": len(job.input_ids)}
            hit = next((s for s in job.spec.stop if s in job.text), None)
            if hit is not None:
                cut = job.text.index(hit)
                result["text"] = word[: max(0, len(word) - (len(job.text) - cut))]
                job.text = job.text[:cut]
                result.update(eos=True, eos_reason="stop_string")
            elif job.generated >= job.spec.max_tokens:
                result.update(eos=True, eos_reason="max_new_tokens")
            if result["eos"]:
                result["full_completion"] = job.text
                self.running.remove(job)
            results.append(result)
        return results


def fake_server(api_key=None, allow_any_model=True, model_names=(), **gen_kwargs):
    """A fake engine behind the app; these tests name models freely ("m"), so any name is accepted
    unless allow_any_model=False (see test_unknown_model_is_404)."""
    gen = FakeGenerator(**gen_kwargs)
    engine = Engine(gen, FakeTokenizer(), model_name="fake-model", max_seq_len=64, job_factory=FakeJob).start()
    app = create_app(engine, api_key=api_key, allow_any_model=allow_any_model, model_names=model_names)
    return gen, engine, ThreadServer(app)


@pytest.fixture(scope="module")
def fake():
    gen, engine, server = fake_server(step_s=0.002)
    with server:
        yield gen, engine, server
    engine.stop()


def client(base: str, key: str = "none", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60, **kw)


# -------------------------------------------------------------------------- fake: shapes


def test_models_health_metrics(fake):
    gen, engine, srv = fake
    models = client(srv.base).models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    assert http(srv.base, "/health") == (200, {"status": "ok", "model": "fake-model"})
    m = get_metrics(srv.base)
    for name in ("lowgear_queue_length", "lowgear_running_jobs", "lowgear_pages_in_use", "lowgear_tokens_per_second"):
        assert name in m
    status, text = http(srv.base, "/metrics")
    assert "# TYPE lowgear_pages_in_use gauge" in text
    assert http(srv.base, "/v1/models/nope")[0] == 404


def test_chat_and_completion_shapes(fake):
    gen, engine, srv = fake
    c = client(srv.base)
    chat = c.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi there"}],
                                     max_tokens=3, temperature=0)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == "alpha beta gamma "
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 3 and chat.usage.total_tokens == chat.usage.prompt_tokens + 3

    comp = c.completions.create(model="fake-model", prompt="one two", max_tokens=2, temperature=0)
    assert comp.object == "text_completion"
    assert comp.choices[0].text == "alpha beta "
    assert comp.usage.prompt_tokens == 2

    stream = c.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "alpha beta gamma "
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert len({ch.id for ch in chunks}) == 1


def test_n_choices_stop_and_seed(fake):
    gen, engine, srv = fake
    c = client(srv.base)
    comp = c.completions.create(model="fake-model", prompt=["a b", "c"], max_tokens=4, temperature=0, n=2)
    assert sorted(ch.index for ch in comp.choices) == [0, 1, 2, 3]
    assert comp.usage.prompt_tokens == 3  # each prompt counted once, not once per choice
    stopped = c.completions.create(model="fake-model", prompt="x", max_tokens=8, temperature=0, stop=["gamma"])
    assert stopped.choices[0].text == "alpha beta " and stopped.choices[0].finish_reason == "stop"
    a = c.completions.create(model="fake-model", prompt="x", max_tokens=8, temperature=1.0, seed=5, n=2)
    b = c.completions.create(model="fake-model", prompt="x", max_tokens=8, temperature=1.0, seed=5, n=2)
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]


def test_generator_runs_on_one_thread(fake):
    gen, engine, srv = fake
    c = client(srv.base)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: c.completions.create(model="m", prompt=f"p {i}", max_tokens=4,
                                                           temperature=0).choices[0].text, range(16)))
    assert outs == ["alpha beta gamma delta "] * 16
    assert gen.thread_ids == {engine._thread.ident}


# ----------------------------------------------------------------------- fake: errors


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temprature": 0.5}, "temprature"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
])
def test_validation_errors_are_400_in_openai_shape(fake, body, param):
    status, err = http(fake[2].base, "/v1/chat/completions", body)
    assert status == 400, err
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "invalid_request_error"
    assert err["error"]["param"] == param
    assert param.split(".")[0] in err["error"]["message"]


def test_bad_json_and_bad_completion_prompts(fake):
    base = fake[2].base
    status, err = http(base, "/v1/completions", raw=b"{not json")
    assert status == 400 and "JSON" in err["error"]["message"]
    status, err = http(base, "/v1/completions", {"model": "m", "prompt": [], "max_tokens": 2})
    assert status == 400 and err["error"]["param"] == "prompt"
    status, err = http(base, "/v1/completions", {"model": "m", "prompt": [5000], "max_tokens": 2})
    assert status == 400 and "token ids" in err["error"]["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client(base).completions.create(model="m", prompt="x", max_tokens=2, temperature=-1)
    assert "temperature" in str(info.value)


def test_context_too_long(fake):
    c = client(fake[2].base)
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="m", prompt="word " * 70, max_tokens=2)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="m", prompt="a b c", max_tokens=62)
    assert info.value.code == "context_length_exceeded" and "max_tokens" in info.value.message


def test_api_key():
    gen, engine, server = fake_server(api_key="sekrit")
    with server:
        with pytest.raises(openai.AuthenticationError) as info:
            client(server.base, key="wrong").models.list()
        assert info.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(server.base, key="wrong").chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert http(server.base, "/v1/models")[0] == 401
        assert http(server.base, "/health")[0] == 200
        ok = client(server.base, key="sekrit").completions.create(model="m", prompt="x", max_tokens=2, temperature=0)
        assert ok.choices[0].text == "alpha beta "
    engine.stop()


# ------------------------------------------------------------------- fake: cancellation


def test_disconnect_mid_stream_cancels_and_frees_pages():
    gen, engine, server = fake_server(step_s=0.02)
    with server:
        sock, got = open_stream(server.port, "/v1/completions",
                                {"model": "m", "prompt": "x", "max_tokens": 60, "stream": True}, wanted_events=3)
        assert b'"text_completion"' in got
        assert len(gen.running) == 1
        sock.close()
        assert wait_until(lambda: len(gen.cancelled) == 1 and not gen.running, timeout=10)
        assert wait_until(lambda: get_metrics(server.base)["lowgear_pages_in_use"] == 0, timeout=5)
        assert get_metrics(server.base)["lowgear_requests_cancelled_total"] == 1
    engine.stop()


def test_disconnect_while_waiting_for_whole_answer_cancels():
    gen, engine, server = fake_server(step_s=0.02)
    with server:
        sock, _ = open_stream(server.port, "/v1/completions",
                              {"model": "m", "prompt": "x", "max_tokens": 60}, wanted_events=0)
        assert wait_until(lambda: len(gen.running) == 1, timeout=10)
        sock.close()
        assert wait_until(lambda: len(gen.cancelled) == 1 and not gen.running, timeout=10)
    engine.stop()


def test_a_failing_step_fails_its_requests_and_the_server_goes_on():
    gen, engine, server = fake_server(fail_on_step=2)
    with server:
        c = client(server.base)
        with pytest.raises(openai.InternalServerError):
            c.completions.create(model="m", prompt="x", max_tokens=5)
        assert c.completions.create(model="m", prompt="x", max_tokens=2, temperature=0).choices[0].text == "alpha beta "
        assert http(server.base, "/health")[0] == 200
    engine.stop()


def test_a_failing_step_mid_stream_sends_an_error_event():
    gen, engine, server = fake_server(fail_on_step=3)
    with server:
        c = client(server.base)
        stream = c.completions.create(model="m", prompt="x", max_tokens=5, temperature=0, stream=True)
        texts = []
        with pytest.raises(openai.APIError) as info:
            for chunk in stream:
                texts.append(chunk.choices[0].text)
        assert "generation failed" in str(info.value)
        assert texts == ["alpha ", "beta "]
        assert get_metrics(server.base)["lowgear_requests_failed_total"] == 1
    engine.stop()


def test_completion_echo(fake):
    c = client(fake[2].base)
    out = c.completions.create(model="m", prompt="hello world", max_tokens=1, temperature=0, echo=True)
    assert out.choices[0].text == "hello worldalpha "
    parts = list(c.completions.create(model="m", prompt="hello", max_tokens=1, temperature=0, echo=True, stream=True))
    assert "".join(p.choices[0].text for p in parts) == "helloalpha "


def test_engine_bridge_without_http():
    gen = FakeGenerator()
    engine = Engine(gen, FakeTokenizer(), model_name="m", max_seq_len=64, job_factory=FakeJob).start()
    from lowgear.server.openai_types import SamplingSpec

    async def run():
        sink = asyncio.Queue()
        spec = SamplingSpec(3, 0.0, 1.0, 0, 0.0, 0.0, 0.0, (), None)
        await engine.submit([1, 2], spec, index=0, sink=sink)
        with pytest.raises(ContextLengthError):
            await engine.submit([1] * 63, spec, index=1, sink=sink)
        events = []
        while not (events and events[-1].done):
            events.append(await asyncio.wait_for(sink.get(), 5))
        return events

    events = asyncio.run(run())
    assert "".join(e.text for e in events) == "alpha beta gamma "
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 3
    engine.stop()
    assert not engine.alive


# ------------------------------------------------------------ the real model, end to end

CTX = 512


@pytest.fixture(scope="module")
def real():
    proc, base = start_model_server("--max-seq-len", str(CTX), "--cache-size", "2048", "--max-batch-size", "8")
    yield base
    stop_model_server(proc)


PYTHON_API = """
import json, sys
import lowgear as lg
ctx, prompt, chat, n = json.loads(sys.argv[1])
config = lg.Config(lg.default_model_path())
config.max_seq_len = ctx
model = lg.Model(config)
cache = lg.Cache(model, max_seq_len=ctx, page_size=256)
model.load_autosplit(cache)
tok = lg.Tokenizer(config)
gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tok, paged=True, max_batch_size=4)
greedy = lg.Sampler.Settings.greedy()
plain = gen.generate(prompt=prompt, max_new_tokens=n, gen_settings=greedy, add_bos=tok.add_bos_default,
                     completion_only=True)
chat_text = gen.generate(prompt=tok.apply_chat_template(chat, add_generation_prompt=True), max_new_tokens=n,
                         gen_settings=greedy, encode_special_tokens=True, completion_only=True)
print(json.dumps([plain, chat_text]))
"""


def python_api_greedy(prompt: str, chat: list[dict], n: int) -> tuple[str, str]:
    """Greedy completions of a prompt and a chat by the Python API, in a process like the server's."""
    out = subprocess.run([sys.executable, "-c", PYTHON_API, json.dumps([CTX, prompt, chat, n])], env=user_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    plain, chat_text = json.loads(out.stdout.strip().splitlines()[-1])
    return plain, chat_text


CHAT = [{"role": "user", "content": "Name three colors."}]


def test_real_chat_and_completion_stream_and_not(real):
    c = client(real)
    whole = c.chat.completions.create(model="any", messages=CHAT, max_tokens=12, temperature=0)
    text = whole.choices[0].message.content
    assert text and whole.usage.completion_tokens <= 12
    chunks = list(c.chat.completions.create(model="any", messages=CHAT, max_tokens=12, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason

    comp = c.completions.create(model="any", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert comp.choices[0].text and comp.choices[0].finish_reason in ("stop", "length")
    parts = list(c.completions.create(model="any", prompt="The capital of France is", max_tokens=8, temperature=0,
                                      stream=True))
    assert "".join(p.choices[0].text for p in parts) == comp.choices[0].text


def test_real_greedy_equals_python_api(real):
    prompt = "Once upon a time, in a small village,"
    local, local_chat = python_api_greedy(prompt, CHAT, 12)
    c = client(real)
    served = c.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    assert served == local
    served_chat = c.chat.completions.create(model="any", messages=CHAT, max_tokens=12, temperature=0)
    assert served_chat.choices[0].message.content == local_chat


def test_real_stop_strings(real):
    c = client(real)
    prompt = "1, 2, 3, 4, 5,"
    full = c.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    assert len(full.strip()) > 2, full
    stop = full.strip()[1:3]  # a piece from inside the answer
    cut = full[: full.index(stop)]
    stopped = c.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].text == cut
    assert stopped.choices[0].finish_reason == "stop"
    streamed = list(c.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0, stop=stop, stream=True))
    assert "".join(p.choices[0].text for p in streamed) == cut


def test_real_seeds_reproduce(real):
    c = client(real)
    kw = dict(model="any", messages=[{"role": "user", "content": "Write a word."}], max_tokens=10, temperature=1.0,
              top_p=1.0)
    a = c.chat.completions.create(seed=1234, n=2, **kw)
    b = c.chat.completions.create(seed=1234, n=2, **kw)
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    streamed = list(c.chat.completions.create(seed=1234, stream=True, **kw))
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == a.choices[0].message.content


def test_real_clear_4xx(real):
    c = client(real)
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="any", prompt="hello " * 600, max_tokens=4)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="any", messages=CHAT, max_tokens=CTX)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="any", messages=CHAT, max_tokens=4, extra_body={"top_k": -1})
    assert "top_k" in info.value.message
    # the extensions themselves work: top_k=1 is greedy whatever the temperature
    greedy = c.completions.create(model="any", prompt="Red, green,", max_tokens=4, temperature=0).choices[0].text
    top1 = c.completions.create(model="any", prompt="Red, green,", max_tokens=4, temperature=1.5,
                                extra_body={"top_k": 1, "min_p": 0.1}).choices[0].text
    assert top1 == greedy


def test_real_pages_free_after_requests(real):
    assert wait_until(lambda: get_metrics(real)["lowgear_pages_in_use"] == 0, timeout=10)
    m = get_metrics(real)
    assert m["lowgear_running_jobs"] == 0 and m["lowgear_queue_length"] == 0
    assert m["lowgear_generated_tokens_total"] > 0
