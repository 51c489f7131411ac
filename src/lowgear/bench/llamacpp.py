"""llama.cpp as a peer in `lowgear bench`: its own `llama-batched-bench` on the same GGUF file, same run.

`lowgear bench --model FILE.gguf --llama-cpp DIR` runs DIR/llama-batched-bench (a build of llama.cpp,
e.g. from the source in PyPI's llama-cpp-python sdist: benchmarks/llamacpp_peer_gpu.sh builds one)
on each GGUF file lowgear times, with every layer on the GPU and flash attention on, and reads its
JSON lines:

- decode: for each context c, `-npp c -ntg NEW -npl b1,b2,...` (b independent sequences, each with a
  c-token prompt, then NEW tokens each). llama.cpp's S_TG (b * NEW / generation seconds) is the
  tokens/s lowgear's decode figure at (b, c) is set beside: both are whole-batch tokens per second
  of steps over a c-token context (llama.cpp's grows from c to c + NEW; NEW is small).
- prefill: `-npp P -ntg 1 -npl 1`, llama.cpp's S_PP (P / prompt seconds).

Only the command line and llama.cpp's JSON keys (`pp`, `tg`, `pl`, `speed_pp`, `speed_tg`) are relied on.
"""

from __future__ import annotations

import json
import os
import subprocess

from ..errors import LowgearError

BINARY = "llama-batched-bench"
NEW_TOKENS = 32  # tokens generated per sequence in llama.cpp's decode run


def find_binary(folder: str) -> str:
    """DIR/llama-batched-bench (or DIR/bin/...), or a one-line error saying what to build."""
    for path in (os.path.join(folder, BINARY), os.path.join(folder, "bin", BINARY)):
        if os.access(path, os.X_OK):
            return path
    raise LowgearError(f"--llama-cpp {folder}: no executable {BINARY} there; build llama.cpp's tools "
                       "(benchmarks/llamacpp_peer_gpu.sh shows how) and pass the folder holding them")


def parse_jsonl(text: str) -> list[dict]:
    """llama-batched-bench's --output-format jsonl lines (other lines, its log, are skipped)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            rows.append(json.loads(line))
    return rows


def command(binary: str, path: str, prompt: int, new: int, batches: list[int], gpu: int | None) -> list[str]:
    ctx = max(batches) * (prompt + new) + 256
    cmd = [binary, "-m", path, "-ngl", "999", "-fa", "on", "-c", str(ctx), "-b", "2048", "-ub", "512",
           "-npp", str(prompt), "-ntg", str(new), "-npl", ",".join(map(str, batches)), "--output-format", "jsonl"]
    if gpu is not None:
        cmd += ["--main-gpu", str(gpu), "-sm", "none"]
    return cmd


def run(binary: str, path: str, prompt: int, new: int, batches: list[int], gpu: int | None = None,
        timeout: float = 600.0) -> list[dict]:
    """One llama-batched-bench run; its rows, or LowgearError with the tail of its log."""
    cmd = command(binary, path, prompt, new, batches, gpu)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise LowgearError(f"llama.cpp did not finish in {timeout:.0f} s: {' '.join(cmd)}") from exc
    rows = parse_jsonl(done.stdout)
    if done.returncode != 0 or not rows:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise LowgearError(f"llama.cpp failed (exit {done.returncode}) on {path}: {tail}")
    return rows


def decode_figures(rows: list[dict]) -> list[dict]:
    """(batch, context, tokens/s, ms/step) of each decode row: S_TG, and one step = pl tokens."""
    out = []
    for r in rows:
        tps = float(r["speed_tg"])
        out.append({"batch": int(r["pl"]), "context": int(r["pp"]), "tokens_per_s": tps,
                    "ms_per_step": 1e3 * int(r["pl"]) / tps if tps > 0 else None})
    return out


def prefill_figure(rows: list[dict]) -> dict:
    r = rows[0]
    tps = float(r["speed_pp"])
    return {"batch": 1, "context": int(r["pp"]), "tokens_per_s": tps, "ms_per_step": 1e3 * int(r["pp"]) / tps}
