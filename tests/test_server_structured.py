"""Logprobs, structured output and tool calls on the OpenAI server, against a real `lowgear serve`.

The embedded SmolLM2 model serves on loopback; the official openai client asks. Logprobs meet a
log-softmax of Hugging Face transformers' logits on the same GGUF weights; JSON answers meet the
`jsonschema` validator; tool calls meet their tools' parameter schemas.
"""

from __future__ import annotations

import json
import math
import os

import jsonschema
import pytest
import torch

from test_server import client, http, start_model_server, stop_model_server

CTX = 1024


@pytest.fixture(scope="module")
def real():
    proc, base = start_model_server("--max-seq-len", str(CTX), "--cache-size", "4096", "--max-batch-size", "8")
    yield base
    stop_model_server(proc)


@pytest.fixture(scope="module")
def hf(smollm2_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path), dtype=torch.float32).eval()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log-softmax of transformers' logits at every position of `ids` (float64)."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)


# ------------------------------------------------------------------------------------ logprobs


def test_completion_logprobs_match_transformers(real, hf):
    prompt = [504, 3575, 282, 4649, 314]  # token ids: no tokenizer between the two sides
    c = client(real)
    out = c.completions.create(model="any", prompt=prompt, max_tokens=6, temperature=0, logprobs=5)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    stream = list(c.completions.create(model="any", prompt=prompt, max_tokens=6, temperature=0, logprobs=5,
                                       stream=True))
    streamed = [x for ch in stream if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)
    # greedy: the best alternative of each step is the token itself; offsets count the tokens' text
    offset = 0
    for tok, value, top, off in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset):
        assert off == offset
        offset += len(tok)
        assert len(top) == 5 and max(top.values()) == pytest.approx(value, abs=1e-6)
    # transformers over the prompt plus the generated tokens (greedy: each one is its step's argmax)
    ids = list(prompt)
    for i in range(6):
        ref = hf_logprobs(hf, ids)[-1]
        best = int(ref.argmax())
        assert lp.token_logprobs[i] == pytest.approx(float(ref[best]), abs=2e-3)
        top_ref = sorted(ref.tolist(), reverse=True)[:5]
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(top_ref, abs=2e-3)
        ids.append(best)


def test_chat_logprobs_shape_and_values(real, hf):
    c = client(real)
    msgs = [{"role": "user", "content": "Say hi."}]
    out = c.chat.completions.create(model="any", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                    top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy: the best
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert entry.logprob <= 0 and sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-6
    chunks = list(c.chat.completions.create(model="any", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                            top_logprobs=3, stream=True))
    streamed = [e.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content], abs=1e-6)
    # no logprobs asked: none given
    plain = c.chat.completions.create(model="any", messages=msgs, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, None),
])
def test_logprobs_limits_are_400_naming_the_field(real, path, body, param):
    status, answer = http(real, path, {"model": "any", "max_tokens": 2, **body})
    assert status == 400, answer
    assert "top_logprobs" in answer["error"]["message"] or "logprobs" in answer["error"]["message"]
    if param:
        assert answer["error"]["param"] == param
