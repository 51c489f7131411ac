"""A long run of the corrupted-model-file fuzzer (tests/fuzz_files_lib.py): N hypothesis cases per
target, each loaded and run for two tokens; prints cases tried, clean lowgear errors, loads that
worked and crashes (any other exception) per target, and each crash's reproducer.

    PYTHONPATH=src python benchmarks/fuzz_files.py --examples 1000 [--target gguf_data] [--seed 1]

Exit status 1 when any case crashed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from hypothesis import HealthCheck, given, seed as hyp_seed, settings  # noqa: E402

from fuzz_files_lib import TARGETS, Bases, run_case  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=300, help="cases per target")
    p.add_argument("--target", action="append", choices=sorted(TARGETS), help="only these targets (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    args = p.parse_args()
    torch_threads()
    names = args.target or list(TARGETS)
    total_crashes = 0
    with tempfile.TemporaryDirectory() as root:
        bases = Bases.make(os.path.join(root, "bases"))
        work = os.path.join(root, "work")
        os.makedirs(work)
        print(f"{'target':24} {'cases':>6} {'ok':>6} {'error':>6} {'crash':>6} {'s':>6}")
        for name in names:
            target = TARGETS[name]
            counts = {"ok": 0, "error": 0, "crash": 0}
            crashes: list[tuple[object, str]] = []

            @settings(max_examples=args.examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(target.strategy)
            def case(mutation):
                kind, detail = run_case(target, bases, mutation, work)
                counts[kind] += 1
                if kind == "crash":
                    crashes.append((mutation, detail))

            if args.seed is not None:
                case = hyp_seed(args.seed)(case)
            t0 = time.perf_counter()
            case()
            n = sum(counts.values())
            print(f"{name:24} {n:6d} {counts['ok']:6d} {counts['error']:6d} {counts['crash']:6d} {time.perf_counter() - t0:6.1f}",
                  flush=True)
            for mutation, detail in crashes[:5]:
                print(f"    crash: {name} mutation={mutation!r}\n      " + detail.strip().replace("\n", "\n      "))
            total_crashes += len(crashes)
    print(f"crashes: {total_crashes}")
    return 1 if total_crashes else 0


def torch_threads() -> None:
    import torch

    torch.set_num_threads(1)


if __name__ == "__main__":
    sys.exit(main())
