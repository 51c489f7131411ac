"""Replicas on Ray Serve: two replicas of the embedded model on a local Ray cluster (2 CPUs), requests
from the official openai client spread over both (the replica header says who answered), each replica
answering like `lowgear serve` does. Runs where the `ray` extra is installed."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from lowgear.server.ray_serve import REPLICA_HEADER, build_app  # noqa: E402

from test_server import client, free_port, get_metrics, http, user_env  # noqa: E402

pytestmark = pytest.mark.slow
ASK = [{"role": "user", "content": "Name three colors."}]


def spread(base: str, n: int = 16) -> tuple[set[str], list]:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: ask(base, i), range(n)))
    return {r for r, _ in answers}, [a for _, a in answers]


def _foreground() -> None:
    """SIGINT back to its default in the child, as in a terminal's foreground job: a signal ignored by the
    parent is inherited across exec, and a library used earlier in the suite leaves SIGINT ignored in pytest's
    process (seen in the full suite: the server's SigIgn mask had SIGINT, so Ctrl-C never reached it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_the_cli(smollm2_path, tmp_path):
    """`lowgear serve --ray --replicas 2` (first in this file: one Ray cluster at a time); Ctrl-C stops it."""
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from lowgear.cli import main; sys.exit(main())",
                             "serve", "--ray", "--replicas", "2", "--port", str(port), "--threads", "1",
                             "--max-seq-len", "512", "--cache-size", "512", "--served-model-name", "smol",
                             "--model", smollm2_path], env=user_env(), stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=_foreground)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if http(base, "/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        log.seek(0)
        assert proc.poll() is None and http(base, "/health")[0] == 200, log.read()
        replicas, answers = spread(base)
        assert len(replicas) == 2, replicas
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    assert rc == 0


@pytest.fixture(scope="module")
def ray_base(smollm2_path):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(smollm2_path, replicas=2, num_cpus=1, num_gpus=0, max_seq_len=512, cache_size=512,
                        max_batch_size=2, threads=1, model_names=["smol"])
        serve.run(app, name="lowgear", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def ask(base: str, i: int):
    raw = client(base).chat.completions.with_raw_response.create(
        model="smol", messages=ASK, max_tokens=4, temperature=0)
    return raw.headers[REPLICA_HEADER], raw.parse()


def test_requests_spread_over_two_replicas(ray_base):
    replicas, answers = spread(ray_base)
    assert len(replicas) == 2, replicas
    texts = {a.choices[0].message.content for a in answers}
    assert len(texts) == 1 and next(iter(texts))  # greedy: every replica gives the same answer
    assert all(a.usage.completion_tokens == 4 and a.model == "smol" for a in answers)


def test_each_replica_serves_the_whole_api(ray_base):
    status, body = http(ray_base, "/health")
    assert status == 200 and body["model"] == "smol"
    stream = client(ray_base).chat.completions.create(model="smol", messages=ASK, max_tokens=4, temperature=0,
                                                      stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == ask(ray_base, 0)[1].choices[0].message.content
    assert get_metrics(ray_base)["lowgear_generated_tokens_total"] > 0
    status, body = http(ray_base, "/v1/messages", {"model": "smol", "max_tokens": 3, "messages": ASK})
    assert status == 200 and body["usage"]["output_tokens"] == 3
    status, body = http(ray_base, "/v1/chat/completions", {"model": "other", "messages": ASK})
    assert status == 404 and body["error"]["code"] == "model_not_found"
