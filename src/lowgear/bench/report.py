"""`lowgear bench`'s output: one line per figure, the summary table, bench.json and the bench.png plot."""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from ..errors import install_hint
from ..formats.spec import ModelSpec

GiB = 2**30


def _fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _describe(w: dict) -> str:
    parts = [w.get("engine", ""), w.get("model", ""), w.get("quant", ""), w.get("rung") or "", w.get("kind", "")]
    if "batch" in w:
        parts.append(f"bs={w['batch']} ctx={w['context']}")
    return " ".join(p for p in parts if p)


def _line(r: dict) -> str:
    head = f"{r['engine']} {r['shape']} {r['quant']} {r['dtype']} {r['rung']} {r['kind']} bs={r['batch']} ctx={r['context']} on {r['device']}: "
    if r["kind"] == "generate":
        tps = f"{r['tokens_per_s']:.1f} tok/s decode" if r["tokens_per_s"] else ""
        return head + f"time to first token {r['ttft_ms']:.1f} ms, {tps}"
    text = head + f"{r['tokens_per_s']:.1f} tok/s, {r['ms_per_step']:.2f} ms/step"
    if "pct_roofline" in r:
        text += f", {r['pct_roofline']:.0f}% of memory roofline ({r['roofline_ms']:.2f} ms)"
    if "pct_peak_flops" in r:
        text += f", {_flops(r['flops_per_s'])} = {r['pct_peak_flops']:.0f}% of measured matmul peak"
    mem = r.get("memory", {}).get("peak_allocated_bytes")
    if mem:
        text += f", peak memory {_fmt_bytes(mem)}"
    return text


def _flops(x: float) -> str:
    return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


# ---------------------------------------------------------------- output
def plot(report: dict, path: str) -> str | None:
    """Decode tokens/s and % of roofline against batch size, one row per (model, context); None without matplotlib.

    Colour is the rung, line style the weights (solid float, dotted packed); transformers is grey, dashed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    decode = [r for r in report["results"] if r["kind"] == "decode"]
    rows = list(dict.fromkeys((r["model"], r["context"]) for r in decode)) or [("(no decode figures)", 0)]
    rungs = list(dict.fromkeys(r["rung"] for r in decode if r["engine"] == "lowgear"))
    colors = {rung: plt.get_cmap("tab10")(i % 10) for i, rung in enumerate(rungs)}
    fig, axes = plt.subplots(len(rows), 2, figsize=(13, 3.8 * len(rows)), squeeze=False)
    for row, (model, ctx) in zip(axes, rows):
        lines: dict[tuple, list[dict]] = {}
        for r in decode:
            if (r["model"], r["context"]) == (model, ctx):
                lines.setdefault((r["engine"], r["quant"], r["rung"]), []).append(r)
        for (engine, quant, rung), rs in lines.items():
            rs.sort(key=lambda r: r["batch"])
            xs = [r["batch"] for r in rs]
            if engine == "transformers":
                style = dict(color="grey", ls="--" if rung == "sdpa" else "-.", label=f"transformers {rung} ({rs[0]['dtype']})")
            elif engine == "llama.cpp":
                style = dict(color="black", ls="-", label="llama.cpp (same file)")
            else:
                style = dict(color=colors[rung], ls="-" if quant == "float" else ":", label=f"{rung} {quant}")
                row[1].plot(xs, [r["pct_roofline"] for r in rs], marker="o", **style)
            row[0].plot(xs, [r["tokens_per_s"] for r in rs], marker="o", **style)
        shape = next((r["shape"] for r in decode if r["model"] == model), model)
        dtype = next((r["dtype"] for r in decode if r["model"] == model and r["engine"] == "lowgear"), "")
        for ax, ylabel in zip(row, ("decode tokens/s (all sequences)", "% of memory roofline")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{shape}, {dtype}, context {ctx}, on {report['device']['name']}", fontsize=9)
            ax.grid(True, alpha=0.3)
        row[0].set_yscale("log")
        row[0].legend(fontsize=6, ncol=2)
    m = report["measured"]
    fig.suptitle(f"lowgear bench: copy bandwidth {m['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, "
                 f"{m['matmul_dtype']} matmul {_flops(m['matmul_flops_per_s'])} (measured in this run)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(report: dict, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    json_path, png_path = os.path.join(out_dir, "bench.json"), os.path.join(out_dir, "bench.png")
    report["plot"] = os.path.basename(png_path) if plot(report, png_path) else None
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {json_path}" + (f" and {png_path}" if report["plot"] else
          f" (no plot: {install_hint('bench')} for matplotlib, then lowgear bench --plot-only " + json_path + ")"))
    return report


def summary(report: dict) -> str:
    """A table of the figures, one line each, with the device and shape beside every figure."""
    lines = [f"device: {report['device']['name']} ({report['device']['device']}), "
             f"copy bandwidth {report['measured']['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, "
             f"{report['measured']['matmul_dtype']} matmul {_flops(report['measured']['matmul_flops_per_s'])}"]
    for r in report["results"]:
        text = _line(r)
        if "vs_transformers" in r:
            text += f", ×{r['vs_transformers']['ratio']:.2f} vs transformers ({r['vs_transformers']['attn']})"
        if "vs_llama_cpp" in r:
            text += f", ×{r['vs_llama_cpp']['ratio']:.2f} vs llama.cpp"
        lines.append(text)
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


# ---------------------------------------------------------------- argument and field helpers
def _ints(text) -> list[int]:
    return [int(x) for x in _names(text)]


def _names(text) -> list[str]:
    if not text:
        return []
    items = text if isinstance(text, list) else [text]
    return [x.strip() for item in items for x in str(item).split(",") if x.strip()]


def _pages(tokens: int, page: int) -> int:
    return -(-tokens // page)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _spec_dict(spec: ModelSpec) -> dict:
    d = dataclasses.asdict(spec)
    d.pop("extra", None)
    return d
