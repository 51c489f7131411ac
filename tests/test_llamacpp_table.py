"""benchmarks/llamacpp_table.py: the beside-llama.cpp table from hand-written bench.json files."""

from __future__ import annotations

import json
import os

from helpers import benchmark_module


def result(engine, kind, batch, tps, ms, roofline=None):
    r = {"engine": engine, "kind": kind, "batch": batch, "tokens_per_s": tps, "ms_per_step": ms}
    if roofline is not None:
        r["pct_roofline"] = roofline
    return r


def test_one_row_a_file(tmp_path):
    report = {"device": {"name": "NVIDIA H100 80GB HBM3"}, "results": [
        result("lowgear", "decode", 1, 300.0, 3.333, 52.0), result("lowgear", "decode", 16, 2400.0, 6.667, 31.0),
        result("lowgear", "prefill", 1, 12000.0, 42.7), result("lowgear", "generate", 1, 290.0, 0.0),
        result("llama.cpp", "decode", 1, 250.0, 4.0), result("llama.cpp", "decode", 16, 1600.0, 10.0),
        result("llama.cpp", "prefill", 1, 8000.0, 64.0), result("transformers", "decode", 1, 30.0, 33.3)]}
    os.makedirs(tmp_path / "llama3-8b-q4_0")
    (tmp_path / "llama3-8b-q4_0" / "bench.json").write_text(json.dumps(report))
    t = benchmark_module("llamacpp_table")
    text = t.markdown(t.rows(str(tmp_path)))
    lines = text.splitlines()
    assert lines[0] == "| file | batch 1 | batch 16 | prefill 512 | b16 / b1 step |"
    # 300 / 250 = 1.20, 2400 / 1600 = 1.50, 12000 / 8000 = 1.50; the step ratio 6.667 / 3.333 = 2.00
    assert lines[2] == ("| llama3-8b-q4_0 | 300 (52%); 250: **1.20x** | 2,400 (31%); 1,600: **1.50x** | "
                        "12,000; 8,000: **1.50x** | 2.00 |")
