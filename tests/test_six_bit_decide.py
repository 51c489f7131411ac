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


def test_an_ab_run_of_three_trees(tmp_path):
    """ab_trees_gpu.py's rows (ms a step): `six` over `base`; the `nozrow` tree plays no part."""
    rows = []
    for rnd in range(2):
        for b, base, six in ((1, 4.0, 3.5), (16, 6.0, 6.1), (64, 20.0, 19.0)):
            rows += [{"quant": "q6_k", "batch": b, "round": rnd, "tree": "base", "ms": base, "tokens_equal": False},
                     {"quant": "q6_k", "batch": b, "round": rnd, "tree": "six", "ms": six, "tokens_equal": False},
                     {"quant": "q6_k", "batch": b, "round": rnd, "tree": "nozrow", "ms": 99.0, "tokens_equal": False}]
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "ab.json").write_text(json.dumps({"rows": rows}))
    got = D.figures(tmp_path)
    assert got[("q6_k", 16)]["six"] == [16e3 / 6.1] * 2 and set(got[("q6_k", 1)]) == {"eight", "six"}
    won, lines = D.decide(got, PASSED)
    assert won, lines  # b1 4.0 / 3.5 = 1.14x, b16 6.0 / 6.1 = 0.984x, b64 1.05x
    rows[4]["ms"] = rows[13]["ms"] = 6.2  # b16 six 6.2 ms in both rounds: 0.968x
    (tmp_path / "ab" / "ab.json").write_text(json.dumps({"rows": rows}))
    assert not D.decide(D.figures(tmp_path), PASSED)[0]
