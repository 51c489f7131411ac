"""A small mutation run: operator, comparison, boolean and constant mutations, one at a time, on the
scheduler, the step metadata and the sampler, each judged by its fast tests.

Each worker mutates its own copy of src/ and tests/ (the checkout is never changed), so runs may go
on beside other work. Prints one line per surviving mutant and the counts.

    python benchmarks/experiments/mutate.py [--workers 2] [--only scheduler]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import tokenize
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TARGETS = {
    "scheduler": ("src/lowgear/engine/scheduler.py",
                  ["tests/test_scheduler.py", "tests/test_step_answers.py"]),
    "metadata": ("src/lowgear/attention/metadata.py",
                 ["tests/test_step_answers.py", "tests/test_attention_sdpa.py", "tests/test_generator_graphs.py"]),
    "sampler": ("src/lowgear/engine/sampler.py", ["tests/test_sampler.py", "tests/test_step_answers.py"]),
}
OPS = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "==", "+": "-", "-": "+", "*": "/",
       "/": "*", "//": "*", "%": "//", "+=": "-=", "-=": "+=", "&=": "|=", "|=": "&=", "&": "|", "|": "&"}
NAMES = {"and": "or", "or": "and", "True": "False", "False": "True", "is": "is not", "in": "not in"}


def mutants(source: str):
    """(line, column, old, new) for every mutation that still compiles."""
    lines = source.splitlines(keepends=True)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        (row, col), text = tok.start, tok.string
        if row > len(lines):
            break
        if "no mutate" in lines[row - 1] or lines[row - 1].lstrip().startswith(("def ", "class ", "from ", "import ")):
            continue
        if tok.type == tokenize.OP and text in OPS:
            new = OPS[text]
        elif tok.type == tokenize.NAME and text in NAMES:
            new = NAMES[text]
        elif tok.type == tokenize.NUMBER:
            try:
                value = int(text)
            except ValueError:
                new = repr(float(text) * 2 if float(text) else 1.0)
            else:
                new = str(value + 1)
        else:
            continue
        line = lines[row - 1]
        mutated = "".join(lines[: row - 1]) + line[:col] + new + line[col + len(text):] + "".join(lines[row:])
        try:
            compile(mutated, "<mutant>", "exec")
        except SyntaxError:
            continue
        yield row, col, text, new, mutated


def run_one(work: str, path: str, mutated: str, tests: list[str]) -> bool:
    """True when the tests kill the mutant."""
    target = os.path.join(work, path)
    original = open(target).read()
    open(target, "w").write(mutated)
    try:
        env = dict(os.environ, PYTHONPATH=os.path.join(work, "src"), HYPOTHESIS_PROFILE="default")
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                           cwd=work, env=env, capture_output=True, timeout=300)
        return r.returncode != 0
    except subprocess.TimeoutExpired:
        return True
    finally:
        open(target, "w").write(original)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", choices=sorted(TARGETS))
    parser.add_argument("--from-line", type=int, default=0, help="skip mutants above this line (resume a run)")
    args = parser.parse_args()
    jobs = []
    for name, (path, tests) in TARGETS.items():
        if args.only in (None, name):
            source = open(os.path.join(ROOT, path)).read()
            jobs += [(name, path, tests, m) for m in mutants(source) if m[0] >= args.from_line]
    works = []
    for _ in range(args.workers):
        work = tempfile.mkdtemp(prefix="mutate-")
        shutil.copytree(os.path.join(ROOT, "src"), os.path.join(work, "src"))
        shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(work, "tests"))
        works.append(work)
    free = list(works)

    def one(job):
        name, path, tests, (row, col, old, new, mutated) = job
        work = free.pop()
        try:
            killed = run_one(work, path, mutated, tests)
        finally:
            free.append(work)
        if not killed:
            line = mutated.splitlines()[row - 1].strip()
            print(f"SURVIVED {path}:{row}:{col} {old!r} -> {new!r}   {line}", flush=True)
        return name, killed

    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(one, jobs))
    for name in TARGETS:
        mine = [k for n, k in results if n == name]
        if mine:
            print(f"{name}: {len(mine)} mutants, {sum(mine)} killed, {len(mine) - sum(mine)} survived")
    for work in works:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
