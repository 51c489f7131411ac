"""The beside-llama.cpp table from the folders `benchmarks/llamacpp_peer_gpu.sh` writes (one bench.json a file).

    python benchmarks/llamacpp_table.py OUT_DIR [--json table.json]

One markdown row per GGUF file: lowgear's and llama.cpp's decode tok/s at each batch size and prefill tok/s
with lowgear / llama.cpp, lowgear's % of memory roofline, and its batch-16 step over its batch-1 step.
"""

from __future__ import annotations

import argparse
import glob
import json
import os


def rows(out_dir: str) -> list[dict]:
    table = []
    for path in sorted(glob.glob(os.path.join(out_dir, "*", "bench.json"))):
        report = json.load(open(path))
        name = os.path.basename(os.path.dirname(path))
        row = {"file": name, "device": report["device"]["name"], "decode": {}, "prefill": {}}
        for r in report["results"]:
            if r["kind"] not in ("decode", "prefill") or r["engine"] not in ("lowgear", "llama.cpp"):
                continue
            slot = row["decode"].setdefault(r["batch"], {}) if r["kind"] == "decode" else row["prefill"]
            slot[r["engine"]] = r["tokens_per_s"]
            if r["engine"] == "lowgear":
                slot["ms"] = r["ms_per_step"]
                if "pct_roofline" in r:
                    slot["roofline"] = r["pct_roofline"]
        table.append(row)
    return table


def markdown(table: list[dict]) -> str:
    batches = sorted({b for row in table for b in row["decode"]})
    head = "| file | " + " | ".join(f"batch {b}" for b in batches) + " | prefill 512 | b16 / b1 step |"
    lines = [head, "|" + " --- |" * (len(batches) + 3)]

    def cell(c: dict) -> str:
        lg, lc = c.get("lowgear"), c.get("llama.cpp")
        if lg is None:
            return "-"
        text = f"{lg:,.0f}" + (f" ({c['roofline']:.0f}%)" if "roofline" in c else "")
        return text + (f"; {lc:,.0f}: **{lg / lc:.2f}x**" if lc else "")

    for row in table:
        d = row["decode"]
        step = f"{d[16]['ms'] / d[1]['ms']:.2f}" if 1 in d and 16 in d and "ms" in d[1] and "ms" in d[16] else "-"
        cells = [cell(d.get(b, {})) for b in batches] + [cell(row["prefill"]), step]
        lines.append(f"| {row['file']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--json")
    a = ap.parse_args()
    table = rows(a.out_dir)
    if table:
        print(f"{table[0]['device']}: lowgear tok/s (% of memory roofline); llama.cpp tok/s: lowgear / llama.cpp")
    print(markdown(table))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
