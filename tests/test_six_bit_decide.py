"""benchmarks/six_bit_decide.py: when a GPU run's benches make 6-bit codes the default, on hand-written bench.json files."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import benchmark_module

D = benchmark_module("six_bit_decide")
PASSED = "....\n27 passed in 41.0s\n"


def write(out, model, tree, rnd, tok_s: dict):
    d = out / f"{model}-{tree}-{rnd}"
    d.mkdir()
    results = [{"engine": "lowgear", "kind": "decode", "batch": b, "tokens_per_s": t} for b, t in tok_s.items()]
    results.append({"engine": "lowgear", "kind": "prefill", "batch": 1, "tokens_per_s": 1.0})  # not a decode figure
    (d / "bench.json").write_text(json.dumps({"results": results}))


def test_the_rule(tmp_path):
    write(tmp_path, "q6k", "eight", 1, {1: 200.0, 16: 1800.0, 64: 2400.0})
    write(tmp_path, "q6k", "six", 1, {1: 230.0, 16: 1770.0, 64: 2400.0})  # b1 1.15x, b16 0.983x: wins
    assert D.decide(D.figures(tmp_path), PASSED)[0]
    assert not D.decide(D.figures(tmp_path), "F\nFAILED tests/test_quant_repack.py::test_x[Q6_K-True] - assert\n"
                                             "1 failed, 26 passed\n")[0]
    assert not D.decide(D.figures(tmp_path), "..... (cut)\n")[0]  # tests that did not finish
    write(tmp_path, "q4km", "eight", 1, {1: 250.0, 16: 2000.0})
    write(tmp_path, "q4km", "six", 1, {1: 260.0, 16: 1940.0})  # b16 0.97x: a loss past 2% stops it
    won, lines = D.decide(D.figures(tmp_path), None)
    assert not won and any(line.startswith("q4km batch 16") and line.endswith("<-") for line in lines)
    # the median of rounds: a second q4km round puts b16 at (1940 + 2000) / 2 over 2000 = 0.985x
    write(tmp_path, "q4km", "eight", 2, {1: 250.0, 16: 2000.0})
    write(tmp_path, "q4km", "six", 2, {1: 260.0, 16: 2000.0})
    assert D.decide(D.figures(tmp_path), None)[0]


def test_no_batch_1_or_one_tree_alone_decides_nothing(tmp_path):
    write(tmp_path, "q6k", "six", 1, {1: 300.0})
    assert not D.decide(D.figures(tmp_path), None)[0]
    write(tmp_path, "q6k", "eight", 1, {16: 1000.0})
    assert not D.decide(D.figures(tmp_path), None)[0]


def test_apply_sets_the_line_and_stops_without_it(tmp_path):
    repack = tmp_path / "repack.py"
    shutil.copy(D.REPACK, repack)
    D.apply(str(repack))
    text = repack.read_text()
    assert "\nSIX_BIT = True\n" in text and "\nSIX_BIT = False\n" not in text
    with pytest.raises(SystemExit, match="no line 'SIX_BIT = False'"):
        D.apply(str(repack))
