"""benchmarks/speculative_gpu.py on the CPU at the tiny shape (what the device runs at the 8B shape).

Facts checked from outside the engine: the target as its own draft has every proposal accepted, so
each target step emits k+1 tokens until the last ones (steps = ceil(tokens / (k+1))); greedy
speculation of every kind makes the tokens of plain decoding; the Llama-3 8B and 3.2-1B presets
share Llama 3's vocabulary of 128,256 tokens, which the engine's draft check accepts."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from lowgear.bench.models import PRESETS
from lowgear.engine.speculative import DraftProposer
from lowgear.errors import ConfigError

from helpers import benchmark_module


def bench():
    return benchmark_module("speculative_gpu")


def test_tiny_run_on_the_cpu(tmp_path, capsys):
    bench().main(["--preset", "tiny", "--draft-preset", "tiny", "--quant", "float", "--device", "cpu",
                  "--context", "48", "--tokens", "20", "--rounds", "1", "--page-size", "16",
                  "--draft-lengths", "2,4", "--out", str(tmp_path)])
    with open(tmp_path / "speculative.json") as f:
        result = json.load(f)
    rows = {(r["mode"], r["draft_length"]): r for r in result["rows"]}
    assert set(rows) == {("plain", 0)} | {(m, k) for m in ("perfect", "draft", "ngram") for k in (2, 4)}
    assert result["target_vocab"] == result["draft_vocab"] == 512
    plain = rows["plain", 0]
    assert plain["acceptance"] is None and plain["tokens_per_step"] == 1.0
    for (mode, k), r in rows.items():
        assert r["same_as_plain"] and r["ids"] == plain["ids"], (mode, k)  # greedy: speculation changes nothing
        if mode == "perfect":
            assert r["proposed"] > 0 and r["accepted"] == r["proposed"] and r["acceptance"] == 1.0
            assert r["steps"] == math.ceil(r["tokens"] / (k + 1)), r
        if mode == "draft":  # random weights of another seed: a bad draft
            assert r["proposed"] > 0 and r["acceptance"] < 0.5
    out = capsys.readouterr().out
    assert "perfect" in out and "x plain" in out


def test_llama_presets_pass_the_draft_vocabulary_check():
    assert PRESETS["llama3-8b"].vocab_size == PRESETS["llama3.2-1b"].vocab_size == 128256  # Llama 3's tokenizer

    def stub(name):
        return SimpleNamespace(loaded=True, spec=PRESETS[name])

    cache = SimpleNamespace(allocated=True)
    DraftProposer(stub("llama3.2-1b"), cache, stub("llama3-8b"))  # accepted
    with pytest.raises(ConfigError, match="vocabulary has 151936 tokens but the target's has 128256"):
        DraftProposer(stub("qwen2-0.5b"), cache, stub("llama3-8b"))


def test_embedded_model_ngram_run(tmp_path):
    """`--model embedded`: the summarising prompt through the chat template; the model copies phrases of
    the paragraph, so n-gram proposals are accepted, and the tokens are plain decoding's."""
    result = bench().main(["--model", "embedded", "--device", "cpu", "--modes", "ngram", "--draft-lengths", "3",
                           "--tokens", "12", "--rounds", "1", "--out", str(tmp_path)])
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == {"plain", "ngram"}  # plain is always the baseline
    assert rows["ngram"]["same_as_plain"] and rows["ngram"]["accepted"] > 0
    assert result["prompt_tokens"] > 150 and "paged KV cache" in result["prompt"] and result["output"]
    with open(tmp_path / "speculative.json") as f:
        assert json.load(f)["rows"][1]["ids"] == rows["plain"]["ids"]
