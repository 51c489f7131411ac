"""Which of qmma.py's three untimed choices won in `bash benchmarks/qmma_dq_gpu.sh OUT`, by one written rule.

    python benchmarks/qmma_decide.py OUT            # prints each choice's verdict and the figures behind it
    python benchmarks/qmma_decide.py OUT --apply    # also sets the winners' constants in src/ (a bench after it
                                                    # in the same device command then runs them)

A choice wins when its GPU tests ran to the end without a failure, every A/B row it is judged on had the same
greedy tokens in every tree, and it took at least 1% off the step time it is judged on:
- ROUTE_MAX_M = 64 (the DQ build for 17-64 rows): tree `dq` over `tldot` at batch 32 and 64, each row;
- SPLIT_MAJOR_SUM = True: tree `both` over `dq` at batch 4 and 16, on average, and no row 1% slower;
- PERSISTENT = True: tree `persist` over `dq` at batch 4 and 16, the same, and beating `both` by 1% on average
  (it runs with the split-major sum, so that is switched on with it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics

QMMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "lowgear", "ops", "matmul", "qmma.py")
TESTS = {"route": ("test_dq_matches_float64", "test_dq_sm75_build"), "split_major": ("test_split_major_sum",),
         "persistent": ("test_persistent_grid", "test_split_major_sum")}
LINES = {"route": ("ROUTE_MAX_M = 16", "ROUTE_MAX_M = 64"),
         "split_major": ("SPLIT_MAJOR_SUM = False", "SPLIT_MAJOR_SUM = True"),
         "persistent": ("PERSISTENT = False", "PERSISTENT = True")}


def failed_tests(log: str) -> set[str] | None:
    """Test functions with a failure or error in a pytest log (-rf or -q summary lines); None when the run did
    not reach its summary (cut by its time limit: nothing it left out can count as passed)."""
    if not re.search(r"\d+ passed", log) or "KeyboardInterrupt" in log or "Interrupted" in log:
        return None
    return set(re.findall(r"(?:FAILED|ERROR) \S*::(\w+)", log))


def ratios(summary: list[dict], tree: str, over: str, batches: tuple[int, ...]) -> list[float] | None:
    """tree's median step over `over`'s, one per (weights, batch) row at these batches; None when a row is
    missing or its trees' greedy tokens differed."""
    rows = [r for r in summary if r["batch"] in batches]
    if not rows or any(not r["tokens_equal"] or tree not in r["median_ms"] for r in rows):
        return None
    return [r["median_ms"][tree] / r["median_ms"][over] for r in rows]


def decide(summary: list[dict], log: str) -> dict:
    """{choice: (won, reason)} by the rule in the module docstring."""
    failed = failed_tests(log)
    out = {}

    def tested(choice):
        return failed is not None and not failed & set(TESTS[choice])

    dq = ratios(summary, "dq", "tldot", (32, 64))
    out["route"] = (tested("route") and dq is not None and max(dq) < 0.99, f"dq / tldot at 32-64 rows: {dq}")
    both = ratios(summary, "both", "dq", (4, 16))
    out["split_major"] = (tested("split_major") and both is not None and statistics.mean(both) < 0.99
                          and max(both) < 1.01, f"both / dq at 4-16 rows: {both}")
    pers = ratios(summary, "persist", "dq", (4, 16))
    out["persistent"] = (tested("persistent") and pers is not None and both is not None and max(pers) < 1.01
                         and statistics.mean(pers) < 0.99 * min(1.0, statistics.mean(both)),
                         f"persist / dq at 4-16 rows: {pers}")
    if out["persistent"][0]:  # the persistent tree ran with the split-major sum
        out["split_major"] = (True, out["split_major"][1] + " (on with the persistent grid)")
    if failed is None:
        for k, (won, why) in out.items():
            out[k] = (False, why + "; the GPU tests did not run to the end")
    return out


def apply(verdict: dict, path: str = QMMA) -> list[str]:
    """Set the winners' lines in qmma.py; the lines written."""
    with open(path) as f:
        text = f.read()
    done = []
    for choice, (won, _) in verdict.items():
        old, new = LINES[choice]
        if won:
            if not re.search(rf"^{re.escape(old)}$", text, flags=re.MULTILINE):
                raise SystemExit(f"{path} has no line '{old}'")
            text = re.sub(rf"^{re.escape(old)}$", new, text, flags=re.MULTILINE)
            done.append(new)
    with open(path, "w") as f:
        f.write(text)
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the OUT_DIR given to qmma_dq_gpu.sh")
    ap.add_argument("--apply", action="store_true", help="set the winners' constants in src/")
    a = ap.parse_args()
    try:
        with open(os.path.join(a.out, "ab", "ab.json")) as f:
            summary = json.load(f)["summary"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"no A/B summary under {a.out}/ab ({exc}): nothing wins")
        summary = []
    try:
        with open(os.path.join(a.out, "qmma_tests.log")) as f:
            log = f.read()
    except OSError:
        log = ""
    verdict = decide(summary, log)
    for choice, (won, why) in verdict.items():
        print(f"{LINES[choice][1] if won else LINES[choice][0]:24} {'wins' if won else 'stays'}: {why}")
    if a.apply:
        print("set in src: " + (", ".join(apply(verdict)) or "nothing"))


if __name__ == "__main__":
    main()
