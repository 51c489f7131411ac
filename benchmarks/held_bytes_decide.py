"""Which GEMV choices a GPU run makes the default, by one written rule: 6-bit codes for GGUF's 5/6-bit types
(repack.SIX_BIT, decision 027) and tiles over several small groups (gptq_gemv.SPAN_GROUPS, decision 005).

    python benchmarks/held_bytes_decide.py OUT            # each model's batch sizes, each choice over base, verdicts
    python benchmarks/held_bytes_decide.py OUT --apply    # also sets the winners' lines in src/ (a bench after it in
                                                          # the same device command then runs them)

OUT is what `bash benchmarks/held_bytes_ab_gpu.sh OUT` wrote (OUT/ab/ab.json: trees `base`, `six`, `span`, ...
interleaved on synthetic models), or `bash benchmarks/six_bit_gpu.sh OUT MODELS` (OUT/<model>-<eight|six>-<round>/
bench.json, real files too); both are read. A choice wins when the kernels' GPU tests (OUT/repack_tests.log, where
the run made one) ended without a failure, batch-1 decode got at least 1% more tokens/s on every model it changes
(6-bit codes: those with Q6_K / Q5 layers; spanning tiles: all), and no decode batch of any model lost more than 2%
(each figure the median of its rounds). Greedy tokens are not compared: the weights are the same, but the order of
the sums is not, and a random model's near-ties flip (the tests hold the numerics against float64).
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

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "lowgear")
# tree -> (file under src/lowgear, line off, line on, the models whose batch 1 it must speed up)
CHOICES = {"six": ("ops/matmul/repack.py", "SIX_BIT = False", "SIX_BIT = True", r"q6_k|q5"),
           "span": ("ops/matmul/gptq_gemv.py", "SPAN_GROUPS = False", "SPAN_GROUPS = True", r"")}
GAIN_B1, LOSS_MAX = 1.01, 0.98


def figures(out: str) -> dict:
    """{(model, batch): {tree: [tok/s per round]}} from OUT/ab/ab.json's rows (model = the synthetic quant; ms a step
    of `batch` tokens as tok/s) and OUT/<model>-<eight|six>-<round>/bench.json (trees `base` and `six`)."""
    got: dict = {}
    try:
        with open(os.path.join(out, "ab", "ab.json")) as f:
            rows = json.load(f).get("rows", [])
    except (OSError, ValueError):
        rows = []
    for r in rows:
        if r.get("ms"):
            by_tree = got.setdefault((r["quant"], int(r["batch"])), {})
            by_tree.setdefault(r["tree"], []).append(1e3 * r["batch"] / r["ms"])
    for path in sorted(glob.glob(os.path.join(out, "*", "bench.json"))):
        m = re.fullmatch(r"(.+)-(eight|six)-(\d+)", os.path.basename(os.path.dirname(path)))
        if not m:
            continue
        with open(path) as f:
            results = json.load(f).get("results", [])
        tree = "base" if m.group(2) == "eight" else "six"
        for r in results:
            if r.get("engine") == "lowgear" and r.get("kind") == "decode" and r.get("tokens_per_s"):
                got.setdefault((m.group(1), int(r["batch"])), {}).setdefault(tree, []).append(r["tokens_per_s"])
    return got


def decide(got: dict, log: str | None, tree: str = "six") -> tuple[bool, list[str]]:
    """(`tree` wins over `base`, a line per model and batch, and the reason when it does not)."""
    lines, ok = [], True
    if log is not None:
        failed = failed_tests(log)
        if failed is None or failed:
            ok = False
            why = "did not finish" if failed is None else f"failed: {', '.join(sorted(failed))}"
            lines.append(f"the GPU tests {why}")
    judged = re.compile(CHOICES[tree][3], re.IGNORECASE)
    rows = {k: v for k, v in got.items() if v.get("base") and v.get(tree)}
    if not any(b == 1 and judged.search(model) for model, b in rows):
        return False, lines + [f"no batch-1 figure of a model {tree} changes, with both trees"]
    for (model, batch), v in sorted(rows.items()):
        ratio = statistics.median(v[tree]) / statistics.median(v["base"])
        need = GAIN_B1 if batch == 1 and judged.search(model) else LOSS_MAX
        good = ratio >= need
        ok &= good
        lines.append(f"{model} batch {batch}: {tree} {statistics.median(v[tree]):.0f} / base "
                     f"{statistics.median(v['base']):.0f} tok/s = {ratio:.3f}x (needs >= {need})"
                     + ("" if good else "  <-"))
    return ok, lines


def apply(tree: str, src: str = SRC) -> None:
    """Set `tree`'s line on in its file under src/lowgear."""
    rel, off, on, _ = CHOICES[tree]
    path = os.path.join(src, rel)
    with open(path) as f:
        text = f.read()
    if not re.search(rf"^{re.escape(off)}$", text, flags=re.MULTILINE):
        raise SystemExit(f"{path} has no line '{off}'")
    with open(path, "w") as f:
        f.write(re.sub(rf"^{re.escape(off)}$", on, text, flags=re.MULTILINE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the OUT_DIR given to held_bytes_ab_gpu.sh or six_bit_gpu.sh")
    ap.add_argument("--apply", action="store_true", help="set the winners' lines in src/")
    a = ap.parse_args()
    log = None
    if os.path.exists(os.path.join(a.out, "repack_tests.log")):
        with open(os.path.join(a.out, "repack_tests.log")) as f:
            log = f.read()
    got = figures(a.out)
    for tree, (_, off, on, _) in CHOICES.items():
        won, lines = decide(got, log, tree)
        print("\n".join(lines))
        print(f"{on if won else off}: {'wins' if won else 'stays'}\n")
        if a.apply and won:
            apply(tree)
            print(f"set in src: {on}")


if __name__ == "__main__":
    main()
