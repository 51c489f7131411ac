"""The `lowgear` command end to end on the embedded model: generate, chat, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def lowgear(*args, stdin: str | None = None, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "lowgear.cli.main", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env=env)


def test_generate_streams_a_sensible_completion():
    r = lowgear("generate", "--chat", "--greedy", "-n", "12", "-q", "--max-seq-len", "512", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout  # transformers' greedy answer on the same weights says Paris too


def test_chat_keeps_history_and_obeys_commands():
    r = lowgear("chat", "--greedy", "-n", "8", "--max-seq-len", "512",
                stdin="What is the capital of France?\n/reset\nHello\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "(history cleared)" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--model", "/no/such/model.gguf"], "does not exist"),
        (["generate", "hi", "-q", "--temperature", "-1"], "temperature"),
        (["generate", "hi", "-q", "--top-p", "1.5"], "top_p"),
        (["generate", "hi", "-q", "--devices", "7"], "device"),
        (["generate", "hi", "-q", "--max-seq-len", "lots"], "max-seq-len"),
        (["serve", "--devices", "7", "--port", "0"], "device"),
    ],
)
def test_bad_input_gives_one_clear_line(args, message):
    r = lowgear(*args)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lowgear: error:") and message in last, r.stderr


def test_prompt_longer_than_context_is_refused():
    r = lowgear("generate", "-q", "--max-seq-len", "256", "-n", "8", "word " * 400)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "exceeds the context length" in r.stderr or "more than the whole cache" in r.stderr, r.stderr
