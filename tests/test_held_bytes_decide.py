"""benchmarks/held_bytes_decide.py: which GEMV choices a GPU run makes the default, on hand-written results."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import benchmark_module

D = benchmark_module("held_bytes_decide")
PASSED = "....\n27 passed in 41.0s\n"


def write(out, model, tree, rnd, tok_s: dict):
    d = out / f"{model}-{tree}-{rnd}"
    d.mkdir()
    results = [{"engine": "lowgear", "kind": "decode", "batch": b, "tokens_per_s": t} for b, t in tok_s.items()]
    results.append({"engine": "lowgear", "kind": "prefill", "batch": 1, "tokens_per_s": 1.0})  # not a decode figure
    (d / "bench.json").write_text(json.dumps({"results": results}))


def test_the_rule_on_real_file_benches(tmp_path):
    write(tmp_path, "llama3-8b-q6_k", "eight", 1, {1: 200.0, 16: 1800.0, 64: 2400.0})
    write(tmp_path, "llama3-8b-q6_k", "six", 1, {1: 230.0, 16: 1770.0, 64: 2400.0})  # b1 1.15x, b16 0.983x: wins
    assert D.decide(D.figures(tmp_path), PASSED)[0]
    assert not D.decide(D.figures(tmp_path), "F\nFAILED tests/test_quant_repack.py::test_x[Q6_K-True] - assert\n"
                                             "1 failed, 26 passed\n")[0]
    assert not D.decide(D.figures(tmp_path), "..... (cut)\n")[0]  # tests that did not finish
    write(tmp_path, "llama3-8b-q4_k_m", "eight", 1, {1: 250.0, 16: 2000.0})
    write(tmp_path, "llama3-8b-q4_k_m", "six", 1, {1: 250.0, 16: 1940.0})  # b16 0.97x: a loss past 2% stops it
    won, lines = D.decide(D.figures(tmp_path), None)
    assert not won and any(line.startswith("llama3-8b-q4_k_m batch 16") and line.endswith("<-") for line in lines)
    # the median of rounds: a second round puts b16 at (1940 + 2000) / 2 over 2000 = 0.985x; batch 1 at 1.00x is
    # enough on Q4_K_M (no Q6_K / Q5 in its name: a model the choice is not judged on at batch 1)
    write(tmp_path, "llama3-8b-q4_k_m", "eight", 2, {1: 250.0, 16: 2000.0})
    write(tmp_path, "llama3-8b-q4_k_m", "six", 2, {1: 250.0, 16: 2000.0})
    assert D.decide(D.figures(tmp_path), None)[0]


def test_no_batch_1_or_one_tree_alone_decides_nothing(tmp_path):
    write(tmp_path, "q6k", "six", 1, {1: 300.0})
    assert not D.decide(D.figures(tmp_path), None)[0]
    write(tmp_path, "q6k", "eight", 1, {16: 1000.0})
    assert not D.decide(D.figures(tmp_path), None)[0]


def ab_rows(quant, times: dict) -> list[dict]:
    """ab_trees_gpu.py's rows (ms a step), two rounds: times {batch: {tree: ms}}."""
    return [{"quant": quant, "batch": b, "round": rnd, "tree": t, "ms": ms, "tokens_equal": False}
            for rnd in range(2) for b, by_tree in times.items() for t, ms in by_tree.items()]


def test_an_ab_run_judges_each_choice_on_the_models_it_changes(tmp_path):
    rows = ab_rows("q6_k", {1: {"base": 4.0, "six": 3.5, "span": 3.8, "nozrow": 99.0},
                            16: {"base": 6.0, "six": 6.1, "span": 6.0, "nozrow": 99.0}})
    rows += ab_rows("q4_0", {1: {"base": 3.0, "six": 3.0, "span": 2.7, "nozrow": 99.0},
                             16: {"base": 5.0, "six": 5.0, "span": 5.0, "nozrow": 99.0}})
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "ab.json").write_text(json.dumps({"rows": rows}))
    got = D.figures(tmp_path)
    assert got[("q6_k", 16)]["six"] == [16e3 / 6.1] * 2
    assert D.decide(got, PASSED, "six")[0]  # q6_k b1 1.14x, b16 0.984x; q4_0 (no 6-bit layer) unchanged
    assert D.decide(got, PASSED, "span")[0]  # b1 1.05x and 1.11x
    rows = [dict(r, ms=3.0) if (r["quant"], r["batch"], r["tree"]) == ("q4_0", 1, "span") else r for r in rows]
    (tmp_path / "ab" / "ab.json").write_text(json.dumps({"rows": rows}))
    won, lines = D.decide(D.figures(tmp_path), PASSED, "span")
    assert not won and "q4_0 batch 1: span 333 / base 333 tok/s = 1.000x (needs >= 1.01)  <-" in lines


@pytest.mark.parametrize("tree", ["six", "span"])
def test_apply_sets_the_line_and_stops_without_it(tmp_path, tree):
    rel, off, on, _ = D.CHOICES[tree]
    (tmp_path / rel).parent.mkdir(parents=True)
    shutil.copy(f"{D.SRC}/{rel}", tmp_path / rel)
    D.apply(tree, str(tmp_path))
    text = (tmp_path / rel).read_text()
    assert f"\n{on}\n" in text and f"\n{off}\n" not in text
    with pytest.raises(SystemExit, match=f"no line '{off}'"):
        D.apply(tree, str(tmp_path))
