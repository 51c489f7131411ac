"""`lowgear bench --llama-cpp DIR`: llama.cpp's llama-batched-bench run on the same GGUF file, its JSON
lines read, and each lowgear figure divided by llama.cpp's of the same batch and context.

The llama.cpp here is a stand-in script that records its command line and prints JSON lines in
llama-batched-bench's `--output-format jsonl` shape with hand-written speeds, so the test knows the
answer: what is checked is the command lowgear builds (every layer on the GPU, flash attention on, the
run's prompt length and batches), the reading of the lines, and the ratio's arithmetic.
"""

import json
import os
import stat

import pytest

from lowgear.bench import llamacpp
from lowgear.bench.synthetic import write_gguf
from lowgear.cli.main import make_parser
from lowgear.errors import LowgearError

FAKE = r"""#!/usr/bin/env python3
import json, sys
args = sys.argv[1:]
with open(__file__ + ".calls", "a") as f:
    f.write(json.dumps(args) + "\n")
get = lambda flag: args[args.index(flag) + 1]
pp, tg = int(get("-npp")), int(get("-ntg"))
print("llama_model_load: a log line that is not JSON", file=sys.stderr)
print("main: n_kv_max = 4096")
for pl in map(int, get("-npl").split(",")):
    print(json.dumps({"n_kv_max": 4096, "pp": pp, "tg": tg, "pl": pl, "n_kv": pl * (pp + tg),
                      "t_pp": 0.5, "speed_pp": 1000.0 + pp, "t_tg": 1.0, "speed_tg": 10.0 * pl, "t": 1.5, "speed": 1.0}))
"""


@pytest.fixture
def fake_llama_cpp(tmp_path):
    folder = tmp_path / "llama.cpp"
    folder.mkdir()
    exe = folder / "llama-batched-bench"
    exe.write_text(FAKE)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return folder


def test_bench_sets_llama_cpp_beside_lowgear_on_the_same_file(tmp_path, fake_llama_cpp):
    path = write_gguf(tmp_path / "tiny.gguf", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, qtype="Q8_0")
    out = tmp_path / "out"
    args = make_parser().parse_args(["bench", "--model", path, "--device", "cpu", "--quick", "--no-peer", "--rungs", "eager",
                                     "--batch", "1,2", "--context", "24", "--prefill", "16",
                                     "--llama-cpp", str(fake_llama_cpp), "--out", str(out)])
    assert args.func(args) == 0
    report = json.loads((out / "bench.json").read_text())

    calls = [json.loads(line) for line in (fake_llama_cpp / "llama-batched-bench.calls").read_text().splitlines()]
    assert len(calls) == 2  # one decode run (one context), one prefill run
    for call in calls:
        assert call[call.index("-m") + 1] == path
        assert call[call.index("-fa") + 1] == "on" and int(call[call.index("-ngl") + 1]) >= 999
    decode_call, prefill_call = calls
    assert (decode_call[decode_call.index("-npp") + 1], decode_call[decode_call.index("-npl") + 1]) == ("24", "1,2")
    assert (prefill_call[prefill_call.index("-npp") + 1], prefill_call[prefill_call.index("-npl") + 1]) == ("16", "1")

    peer = {(r["kind"], r["batch"]): r for r in report["results"] if r["engine"] == "llama.cpp"}
    assert peer[("decode", 1)]["tokens_per_s"] == 10.0 and peer[("decode", 2)]["tokens_per_s"] == 20.0
    assert peer[("decode", 2)]["ms_per_step"] == pytest.approx(100.0)  # 2 tokens a step at 20 tokens/s
    assert peer[("prefill", 1)]["tokens_per_s"] == 1016.0
    mine = [r for r in report["results"] if r["engine"] == "lowgear" and r["kind"] in ("decode", "prefill")]
    assert mine
    for r in mine:
        expected = peer[(r["kind"], r["batch"])]["tokens_per_s"]
        assert r["vs_llama_cpp"]["ratio"] == pytest.approx(r["tokens_per_s"] / expected)


def test_a_folder_without_the_tool_is_one_clear_error(tmp_path):
    with pytest.raises(LowgearError, match="llama-batched-bench"):
        llamacpp.find_binary(str(tmp_path))


def test_a_failing_run_names_the_file_and_its_log(tmp_path):
    exe = tmp_path / "llama-batched-bench"
    exe.write_text("#!/bin/sh\necho 'error: unknown model architecture' >&2\nexit 1\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(LowgearError, match="unknown model architecture"):
        llamacpp.run(str(exe), "model.gguf", 16, 4, [1])


def test_jsonl_lines_are_read_and_log_lines_skipped():
    text = 'main: log\n{"pp": 512, "tg": 32, "pl": 16, "speed_pp": 9000.5, "speed_tg": 1600.0}\nllama_perf: done\n'
    rows = llamacpp.parse_jsonl(text)
    assert llamacpp.decode_figures(rows) == [{"batch": 16, "context": 512, "tokens_per_s": 1600.0, "ms_per_step": 10.0}]


def test_llama_cpp_without_gguf_files_is_one_clear_error(tmp_path, fake_llama_cpp):
    """llama.cpp can only time files: with a synthetic preset (no --model) the bench says so before it runs."""
    args = make_parser().parse_args(["bench", "--preset", "tiny", "--device", "cpu", "--quick", "--no-peer",
                                     "--llama-cpp", str(fake_llama_cpp), "--out", str(tmp_path / "out")])
    with pytest.raises(LowgearError, match="--model FILE.gguf"):
        args.func(args)
    assert not (fake_llama_cpp / "llama-batched-bench.calls").exists()
