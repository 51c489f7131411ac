"""The CLI behaves like a tool (issue 25): non-zero exit on every failure, Ctrl-C stops a chat reply
and keeps the conversation, `--max-seq-len auto` bounded on the CPU, `--threads`, `--stats`, and
`make test` announces (and can skip) installing chromium."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from lowgear.bench.synthetic import write_gguf
from lowgear.cli.main import apply_threads, chat_loop
from lowgear.platform import hardware, placement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("cli") / "tiny.gguf", seed=6, max_position_embeddings=512, **TINY)


def lowgear(*args, stdin: str | None = None, env_extra=None, timeout=180):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, "-m", "lowgear.cli.main", *args], input=stdin, capture_output=True,
                       text=True, timeout=timeout, env=env)
    r.lines = [line for line in r.stderr.strip().splitlines() if "RuntimeWarning" not in line]  # runpy's, from -m
    return r


# ------------------------------------------------------------------------------ chat and Ctrl-C


def scripted(lines):
    """An input() that returns each line, raising exceptions given as such, then EOF."""
    it = iter(lines)

    def read(prompt=""):
        item = next(it, EOFError())
        if isinstance(item, BaseException):
            raise item
        return item

    return read


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation():
    seen, closed = [], []

    def reply(history):
        seen.append(history)

        def chunks():
            try:
                yield "Paris is"
                if len(seen) == 1:
                    raise KeyboardInterrupt  # the user pressed Ctrl-C mid-reply
                yield " still the capital."
            finally:
                closed.append(True)

        return chunks()

    out = io.StringIO()
    code = chat_loop(reply, system="be brief", read=scripted(["capital of France?", "and Spain?"]), out=out)
    assert code == 0  # the chat went on to the second turn and ended at EOF
    assert len(seen) == 2
    assert seen[1] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "capital of France?"},
        {"role": "assistant", "content": "Paris is"},  # the stopped reply's text stays
        {"role": "user", "content": "and Spain?"},
    ]
    assert closed == [True, True]  # the interrupted stream was closed (its job cancelled)
    assert "Paris is\nParis is still the capital.\n" in out.getvalue()


def test_ctrl_c_before_any_text_drops_the_unanswered_turn():
    seen = []

    def reply(history):
        seen.append(history)
        if len(seen) == 1:
            raise KeyboardInterrupt
        yield "ok"

    def reply_gen(history):
        return reply(history)

    chat_loop(reply_gen, read=scripted(["first", "second"]), out=io.StringIO())
    assert seen[1] == [{"role": "user", "content": "second"}]


def test_ctrl_c_twice_at_the_prompt_quits_with_130():
    assert chat_loop(lambda h: iter(()), read=scripted([KeyboardInterrupt(), KeyboardInterrupt()]), out=io.StringIO()) == 130
    assert chat_loop(lambda h: iter(()), read=scripted(["/exit"]), out=io.StringIO()) == 0


# ------------------------------------------------------------------------------ exit codes


@pytest.mark.parametrize("args", [
    ["doctor", "--model", "/no/such/model.gguf"],
    ["generate", "hi", "-q", "--model", "/no/such/model.gguf"],
    ["chat", "--model", "/no/such/model.gguf"],
    ["serve", "--port", "0", "--model", "/no/such/model.gguf"],
])
def test_failures_exit_1_with_one_error_line(args):
    r = lowgear(*args, stdin="hi\n")
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.lines[-1].startswith("lowgear: error:") and "does not exist" in r.lines[-1], r.stderr


def test_doctor_exits_0_when_all_is_well(tiny):
    r = lowgear("doctor", "--model", tiny, "--devices", "cpu")
    assert r.returncode == 0, r.stderr
    assert "lowgear: error" not in r.stderr


def test_corrupt_model_is_exit_1(tiny, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(open(tiny, "rb").read()[:5000])
    for args in (["doctor", "--model", str(bad)], ["generate", "-q", "hi", "--model", str(bad)]):
        r = lowgear(*args)
        assert r.returncode == 1 and "truncated" in r.lines[-1], r.stderr


@pytest.mark.parametrize("args", [["generate", "hi", "--threads", "0"], ["generate"], ["serve", "--threads", "x"],
                                  ["chat", "--max-new-tokens", "many"]])
def test_bad_options_exit_2_in_one_line(args):
    r = lowgear(*args)
    assert r.returncode == 2 and len(r.lines) == 1 and ": error:" in r.lines[0], r.stderr


# ------------------------------------------------------------------------------ --threads and --stats


def test_threads_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        apply_threads(SimpleNamespace(threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_free_cores_reads_the_kernels_idle_time(tmp_path, monkeypatch):
    """Two reads of /proc/stat's first line: cores = idle share of the interval x online cores, at least 1."""
    import os
    import time

    from lowgear.platform import hardware

    stat = tmp_path / "stat"
    #         user nice system idle iowait irq softirq steal
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
    later = {"text": "cpu  250 0 150 1000 0 0 0 0 0 0\n"}  # 200 busy + 200 idle ticks: half idle

    def sleep(_s):
        stat.write_text(later["text"])

    monkeypatch.setattr(time, "sleep", sleep)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert hardware.free_cores(stat_path=str(stat)) == 2  # 4 cores, half of their time idle
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\n")
    later["text"] = "cpu  500 0 100 800 0 0 0 0 0 0\n"  # every tick busy: still one thread
    assert hardware.free_cores(stat_path=str(stat)) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # this process may use one core
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\n")
    later["text"] = "cpu  100 0 100 1200 0 0 0 0 0 0\n"
    assert hardware.free_cores(stat_path=str(stat)) == 1
    assert hardware.free_cores(stat_path=str(tmp_path / "missing")) is None


def test_threads_default_to_the_cores_left_idle(monkeypatch):
    from lowgear.platform import hardware

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(hardware, "free_cores", lambda: 1)  # another program holds a core
        apply_threads(SimpleNamespace(threads=None))
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        apply_threads(SimpleNamespace(threads=2))  # asked for: as asked
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(hardware, "free_cores", lambda: None)  # unknown: torch's default stays
        apply_threads(SimpleNamespace(threads=None))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_generate_stats_threads_and_auto(tiny):
    r = lowgear("generate", "-q", "--greedy", "-n", "4", "--stats", "--threads", "1", "--max-seq-len", "auto",
                "--model", tiny, "hello")
    assert r.returncode == 0, r.stderr
    stats = [line for line in r.lines if line.startswith("lowgear: stats:")]
    assert len(stats) == 1 and "tokens/s" in stats[0] and "time to first token" in stats[0], r.stderr
    assert stats[0].endswith("; 1 CPU thread"), stats[0]
    auto = [line for line in r.lines if "--max-seq-len auto" in line]
    assert auto and "512 tokens (the model's context" in auto[0], r.stderr  # not all of the RAM


def test_chat_stats(tiny):
    r = lowgear("chat", "--greedy", "-n", "3", "--stats", "--max-seq-len", "256", "--model", tiny, stdin="hi\n")
    assert r.returncode == 0, r.stderr
    assert any(line.startswith("lowgear: stats:") for line in r.lines), r.stderr


# ------------------------------------------------------------------------------ auto on the CPU


def cpu(free_gib: float):
    return hardware.DeviceInfo(index=-1, kind="cpu", name="CPU", total_memory=int(64 * 2**30),
                               free_memory=int(free_gib * 2**30))


def test_auto_on_the_cpu_is_the_models_context_when_ram_allows():
    spec = SimpleNamespace(max_position_embeddings=8192, tie_word_embeddings=False)
    plan = placement.plan(spec, [10 * 2**20] * 4, {"embed": 2**20, "lm_head": 2**20}, [cpu(32)], 4096, "auto", 0,
                          page_size=256)
    assert plan.max_seq_len == 8192  # before: everything 32 GiB holds (~2 million tokens)


def test_auto_on_the_cpu_is_bounded_by_a_quarter_of_ram():
    spec = SimpleNamespace(max_position_embeddings=10**6, tie_word_embeddings=False)
    per_layer = 64 * 1024  # bytes per token per layer
    plan = placement.plan(spec, [2**20] * 4, {"embed": 2**20, "lm_head": 2**20}, [cpu(4)], per_layer, "auto", 0,
                          page_size=256)
    quarter = 4 * 2**30 // 4 // (per_layer * 4)
    assert quarter - 256 < plan.max_seq_len <= quarter + 255
    tokens, why = placement.cpu_auto_cap(spec, [cpu(4)], per_layer * 4)
    assert tokens == quarter and "1/4 of available RAM" in why


def test_auto_on_a_gpu_still_fills_free_memory():
    gpu = hardware.DeviceInfo(index=0, kind="cuda", name="T4", total_memory=16 * 2**30, free_memory=16 * 2**30,
                              compute_capability=(7, 5))
    assert placement.cpu_auto_cap(SimpleNamespace(max_position_embeddings=4096), [gpu], 1000) is None


# ------------------------------------------------------------------------------ make test and chromium


def test_browser_install_is_announced_and_skippable():
    r = subprocess.run([shutil.which("bash"), os.path.join(ROOT, "scripts", "ensure-browser.sh")], capture_output=True, text=True,
                       env={**os.environ, "LOWGEAR_NO_BROWSER": "1", "PATH": "/nonexistent"}, timeout=30)
    assert r.returncode == 0 and "not installing chromium" in r.stdout and "skipped" in r.stdout
    text = open(os.path.join(ROOT, "scripts", "ensure-browser.sh")).read()
    assert text.index("about to install") < text.index("apt-get install")  # said before it is done
    make = open(os.path.join(ROOT, "Makefile")).read()
    assert "NO_BROWSER" in make
