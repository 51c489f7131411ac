"""Whether a GPU run makes 6-bit codes the default (repack.SIX_BIT), by one rule.

    python benchmarks/six_bit_decide.py OUT            # each model's batch sizes, 6-bit over 8-bit, and the verdict
    python benchmarks/six_bit_decide.py OUT --apply    # also sets SIX_BIT = True in src/ when it wins (a bench after
                                                       # it in the same device command then runs it)

OUT is what `bash benchmarks/held_bytes_ab_gpu.sh OUT` wrote (OUT/ab/ab.json: trees `base` and `six` interleaved,
synthetic models) or `bash benchmarks/six_bit_gpu.sh OUT MODELS` (OUT/<model>-<eight|six>-<round>/bench.json, real
files too); both are read. 6-bit codes win when the kernels' GPU tests (OUT/repack_tests.log, where the run made one)
ended without a failure, every model's batch-1 decode got at least 1% more tokens/s with them, and no decode batch
of any model lost more than 2% (each figure the median of its rounds). Greedy tokens are not compared: the weights
are the same, but the sums' order is not, and a random model's near-ties flip (the tests hold the numerics).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmma_decide import failed_tests

REPACK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "lowgear", "ops", "matmul", "repack.py")
OFF, ON = "SIX_BIT = False", "SIX_BIT = True"
GAIN_B1, LOSS_MAX = 1.01, 0.98


def figures(out: str) -> dict:
    """{(model, batch): {"eight": [tok/s per round], "six": [...]}} from OUT/<model>-<tree>-<round>/bench.json
    and OUT/ab/ab.json's rows (model = the synthetic quant; ms a step of `batch` tokens as tok/s)."""
    got: dict = {}
    try:
        with open(os.path.join(out, "ab", "ab.json")) as f:
            rows = json.load(f).get("rows", [])
    except (OSError, ValueError):
        rows = []
    for r in rows:
        tree = {"base": "eight", "six": "six"}.get(r.get("tree"))
        if tree and r.get("ms"):
            got.setdefault((r["quant"], int(r["batch"])), {}).setdefault(tree, []).append(1e3 * r["batch"] / r["ms"])
    for path in sorted(glob.glob(os.path.join(out, "*", "bench.json"))):
        m = re.fullmatch(r"(.+)-(eight|six)-(\d+)", os.path.basename(os.path.dirname(path)))
        if not m:
            continue
        with open(path) as f:
            results = json.load(f).get("results", [])
        for r in results:
            if r.get("engine") == "lowgear" and r.get("kind") == "decode" and r.get("tokens_per_s"):
                got.setdefault((m.group(1), int(r["batch"])), {}).setdefault(m.group(2), []).append(r["tokens_per_s"])
    return got


def decide(got: dict, log: str | None) -> tuple[bool, list[str]]:
    """(6-bit wins, a line per model and batch, and the reason when it does not)."""
    lines, ok = [], True
    if log is not None:
        failed = failed_tests(log)
        if failed is None or failed:
            ok = False
            lines.append("the GPU tests " + ("did not finish" if failed is None else f"failed: {', '.join(sorted(failed))}"))
    rows = {k: v for k, v in got.items() if v.get("eight") and v.get("six")}
    if not rows or not any(b == 1 for _, b in rows):
        return False, lines + ["no batch-1 figure with both trees"]
    for (model, batch), v in sorted(rows.items()):
        ratio = statistics.median(v["six"]) / statistics.median(v["eight"])
        need = GAIN_B1 if batch == 1 else LOSS_MAX
        good = ratio >= need
        ok &= good
        lines.append(f"{model} batch {batch}: 6-bit {statistics.median(v['six']):.0f} / 8-bit "
                     f"{statistics.median(v['eight']):.0f} tok/s = {ratio:.3f}x (needs >= {need})" + ("" if good else "  <-"))
    return ok, lines


def apply(path: str = REPACK) -> None:
    with open(path) as f:
        text = f.read()
    if not re.search(rf"^{re.escape(OFF)}$", text, flags=re.MULTILINE):
        raise SystemExit(f"{path} has no line '{OFF}'")
    with open(path, "w") as f:
        f.write(re.sub(rf"^{re.escape(OFF)}$", ON, text, flags=re.MULTILINE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the OUT_DIR given to six_bit_gpu.sh")
    ap.add_argument("--apply", action="store_true", help="set SIX_BIT = True in src/ when 6-bit codes win")
    a = ap.parse_args()
    log = None
    if os.path.exists(os.path.join(a.out, "repack_tests.log")):
        with open(os.path.join(a.out, "repack_tests.log")) as f:
            log = f.read()
    won, lines = decide(figures(a.out), log)
    print("\n".join(lines))
    print(f"{ON if won else OFF}: {'wins' if won else 'stays'}")
    if a.apply and won:
        apply()
        print(f"set in src: {ON}")


if __name__ == "__main__":
    main()
