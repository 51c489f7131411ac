"""The server's refusals are 4xx in OpenAI's shape, never a 500, and its port is checked before the
model loads (issue 25)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from lowgear.bench.synthetic import write_gguf
from lowgear.errors import ConfigError
from lowgear.server import bind_socket, load_engine
from lowgear.server.app import create_app

from test_server import ThreadServer, fake_server, free_port, http

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny model behind the real engine and generator (the seed reaches torch)."""
    path = write_gguf(tmp_path_factory.mktemp("srv") / "tiny.gguf", hidden_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, intermediate_size=64, seed=2)
    engine = load_engine(path, max_seq_len=64, cache_size=128, max_batch_size=2).start()
    with ThreadServer(create_app(engine)) as server:
        yield engine, server
    engine.stop()


def test_the_model_answers(tiny):
    engine, server = tiny
    status, body = http(server.base, "/v1/chat/completions", {"model": engine.model_name, **CHAT})
    assert status == 200, body
    assert engine.model_name == "tiny"


@pytest.mark.parametrize("seed", [2**70, -(2**70), 2**63])
def test_huge_seed_is_a_400_naming_seed(tiny, seed):
    engine, server = tiny
    status, body = http(server.base, "/v1/chat/completions", {"model": "tiny", "seed": seed, **CHAT})
    assert status == 400, body
    assert body["error"]["param"] == "seed" and "seed" in body["error"]["message"]


def test_largest_seed_with_n_choices_works(tiny):
    status, body = http(tiny[1].base, "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2,
                                                          "seed": 2**63 - 1, "n": 3, "temperature": 1.0})
    assert status == 200, body


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages.0.content"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\\udfff", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": 2, "stop": ["\\ud800"]}', "stop.0"),
])
def test_lone_surrogate_is_a_400_json_error(tiny, path, raw, param):
    status, body = http(tiny[1].base, path, raw=raw)
    assert status == 400, body
    assert isinstance(body, dict), body  # JSON, not a plain-text 500
    assert body["error"]["param"] == param and "surrogate" in body["error"]["message"]


def test_paired_surrogates_are_fine(tiny):
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 2}'
    assert http(tiny[1].base, "/v1/chat/completions", raw=raw)[0] == 200


def test_unknown_model_is_404_model_not_found():
    gen, engine, server = fake_server(allow_any_model=False, model_names=("alias",))
    with server:
        status, body = http(server.base, "/v1/chat/completions", {"model": "gpt-4o", **CHAT})
        assert status == 404, body
        assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
        assert "gpt-4o" in body["error"]["message"] and "--allow-any-model" in body["error"]["message"]
        status, body = http(server.base, "/v1/completions", {"model": "nope", "prompt": "x", "max_tokens": 2})
        assert status == 404 and body["error"]["code"] == "model_not_found"
        for name in ("fake-model", "alias"):  # the served name and its alias
            assert http(server.base, "/v1/completions", {"model": name, "prompt": "x", "max_tokens": 2})[0] == 200
        assert http(server.base, "/v1/models/alias")[0] == 200
    engine.stop()


def test_allow_any_model_accepts_any_name():
    gen, engine, server = fake_server(allow_any_model=True)
    with server:
        assert http(server.base, "/v1/completions", {"model": "whatever", "prompt": "x", "max_tokens": 2})[0] == 200
    engine.stop()


def serve(*args: str, timeout: float = 120):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "lowgear.cli.main", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("port", ["-1", "65536", "http"])
def test_bad_port_is_one_clean_line(port):
    r = serve("--port", port, "--model", "/no/such/model.gguf")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if "RuntimeWarning" not in line]  # runpy's, from -m
    assert len(lines) == 1 and lines[0].startswith("lowgear serve: error: argument --port:"), r.stderr


def test_port_in_use_is_found_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is already in use"):
            bind_socket("127.0.0.1", port)
        # the model path does not exist: had the model loaded first, the error would be about it
        r = serve("--port", str(port), "--model", "/no/such/model.gguf")
    assert r.returncode == 1
    assert [line for line in r.stderr.strip().splitlines() if "RuntimeWarning" not in line] == [f"lowgear: error: port {port} on 127.0.0.1 is already in use: stop the "
                                             "program that holds it or pick another --port"], r.stderr


def test_bind_socket_listens_on_a_free_port():
    port = free_port()
    sock = bind_socket("127.0.0.1", port)
    try:
        assert sock.getsockname()[1] == port
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        sock.close()


def test_unresolvable_host():
    with pytest.raises(ConfigError, match="cannot resolve --host"):
        bind_socket("no-such-host.invalid", 0)


def test_subnormal_top_p_is_not_a_500(tiny):
    """Found by the schema fuzzer: top_p=5e-324 is 0 in the sampler's float32 and kept no token (index -1)."""
    status, body = http(tiny[1].base, "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2,
                                                          "top_p": 5e-324, "seed": 1})
    assert status == 200, body
