"""`lowgear doctor`: what will run on this machine, and how much context fits, on one screen.

`collect` gathers the facts as plain data (the torch build and its arch list, each device and its
ops — Triton kernels or torch, and why (ops/dispatch.py) —, every attention rung's decision with its
reason, the environment variables in force and, given a model, its quantization (GGUF type mix,
GPTQ bits and group size, EXL2 bits per weight and their per-layer range), its bytes, cache cost,
the tokens that fit per device, the placement and a decode ceiling from the device's bandwidth:
cli/doctor_model.py); `render` prints them; `--json` prints `collect`'s dict. Under LOWGEAR_SIMULATE the same report
describes a simulated machine, which is how "what would happen on a T4" is answered (and tested)
without one.
"""

from __future__ import annotations

import json
import sys

import torch

from ..platform import env, hardware
from ..ops import pdl
from ..ops.matmul import qmma
from ..ops.dispatch import triton_eligibility
from ..platform.dtypes import choose_dtype, dtype_name
from ..errors import LowgearError, MissingDependencyError, require
from .doctor_model import _fmt_tokens, _model

GiB = 2**30


def _dtypes_to_try(device) -> list[torch.dtype]:
    if device.kind == "cpu":
        return [torch.float32]
    cc = device.compute_capability or (0, 0)
    return ([torch.bfloat16] if cc >= (8, 0) else []) + [torch.float16, torch.float32]


def _device_facts(d) -> dict:
    usable = hardware.torch_arch_supported(d)
    return {
        "label": d.label,
        "name": d.name,
        "kind": d.kind,
        "compute_capability": list(d.compute_capability) if d.compute_capability else None,
        "total_memory": d.total_memory,
        "free_memory": d.free_memory,
        "uuid": d.uuid,
        "pci_bus_id": d.pci_bus_id,
        "nvml_index": d.nvml_index,
        "bandwidth": d.bandwidth,
        "fp16_flops": d.fp16_flops,
        "sm_count": d.sm_count,
        "profile": d.profile,
        "simulated": d.simulated,
        "usable": usable,
        "problem": None if usable else hardware.torch_build_hint(d),
        "kernel_launch": pdl.decision(d.compute_capability)[1] if d.kind == "cuda" else None,
        "batched_4bit": qmma.decision(d.compute_capability) if d.kind == "cuda" else None,
        "ops": _ops(d),
    }


def _ops(d) -> dict:
    """The device's ops (ops/dispatch.py): Triton kernels or torch, and why."""
    e = triton_eligibility(d)
    return {"name": "triton" if e.triton else "torch", "triton_kernels": e.triton, "reason": e.reason,
            "probed": e.probed}


def _ops_line(d) -> str:
    ops = d["ops"]
    return f"           Triton kernels: {'yes' if ops['triton_kernels'] else 'no'} — {ops['reason']}"


def _attention(d, switches, requested_dtype, needs: tuple[str, ...] = ()) -> dict:
    """The ladder on device `d`, for a model that `needs` what some rungs lack (select.model_needs)."""
    from ..attention.select import select_backend, survey

    out: dict = {"device": d.label, "dtype": None, "chosen": None, "log": [], "by_dtype": {}, "error": None}
    if not hardware.torch_arch_supported(d):
        out["error"] = hardware.torch_build_hint(d)
        return out
    try:
        dtype = choose_dtype(d, requested_dtype)
    except LowgearError as exc:
        out["error"] = str(exc)
        dtype = choose_dtype(d)
    out["dtype"] = dtype_name(dtype)
    for dt in [dtype] + [x for x in _dtypes_to_try(d) if x != dtype]:
        try:
            sel = select_backend(d, switches, dt, needs)
        except LowgearError as exc:
            out["by_dtype"][dtype_name(dt)] = None
            if dt == dtype:
                out["error"] = str(exc)
            continue
        out["by_dtype"][dtype_name(dt)] = sel.name
        if dt == dtype:
            out["chosen"] = sel.name
            out["probed"] = sel.probed
            out["decode"] = sel.decode_backend.name
            out["decode_reason"] = sel.decode_reason
            out["log"] = [{"name": x.name, "status": x.status, "reason": x.reason} for x in sel.log]
            below = {x.name: x for x in survey(d, switches, dt, needs)} if sel.probed else {}
            for row in out["log"]:
                if row["status"] == "not tried" and row["name"] in below:
                    row["status"] = below[row["name"]].status
                    row["reason"] = below[row["name"]].reason + " (below the chosen rung)"
    return out


def collect(config=None, model_path=None, devices=None, source=None) -> dict:
    """Everything doctor knows, as JSON-ready data. `source` (a WeightSource) stands in for `model_path`."""
    from ..config import Config

    config = config if config is not None else Config()
    errors: list[str] = []
    try:
        switches = config.effective_switches()
    except LowgearError as exc:
        errors.append(str(exc))
        switches = None
    try:
        requested_dtype = config.requested_dtype()
    except LowgearError as exc:
        errors.append(str(exc))
        requested_dtype = None
    all_devices = hardware.list_devices()
    path = model_path if model_path is not None else config.model_dir
    if source is None and path is not None:
        try:
            from ..formats import open_weights

            source = open_weights(path)
        except LowgearError as exc:
            errors.append(str(exc))
    from ..attention.select import model_needs

    needs = model_needs(source.spec if source is not None else None)
    report: dict = {
        "torch": {
            "version": torch.__version__,
            "cuda_build": torch.version.cuda,
            "arch_list": list(hardware.torch_arch_list(next((d for d in all_devices if d.kind == "cuda"), None))),
        },
        "simulated": hardware.simulated(),
        "devices": [_device_facts(d) for d in all_devices],
        "attention": [_attention(d, switches, requested_dtype, needs) for d in all_devices],
        "env": {name: {"value": value, "meaning": env.ENV_VARS[name]} for name, value in env.snapshot().items()},
        "model": None,
        "errors": errors,
    }
    requested = devices if devices is not None else config.requested_devices()
    try:
        chosen = hardware.resolve_devices(requested) if requested else hardware.default_devices()
    except LowgearError as exc:
        errors.append(str(exc))
        chosen = hardware.default_devices()
    report["selected_devices"] = [d.label for d in chosen]
    try:
        cpu_mode = config.cpu_weights_mode()
    except LowgearError as exc:
        errors.append(str(exc))
        cpu_mode = "auto"
    if source is not None:
        reserve = int(config.reserve_memory_mb) * 2**20
        report["model"] = _model(source, path, chosen, requested_dtype, reserve, config.max_seq_len, cpu_mode)
    return report


def _gib(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _nvml_missing() -> str:
    """Why a GPU has no nvidia-smi number: the optional NVML package is missing (else: the driver's NVML failed)."""
    try:
        require("pynvml", "nvml", "nvidia-smi numbers")
    except MissingDependencyError as exc:
        return f"({exc})"
    return ""


def render(report: dict) -> str:
    """The report as one screen of plain text."""
    t = report["torch"]
    lines = [f"lowgear doctor — torch {t['version']}, CUDA build {t['cuda_build'] or 'none'}, "
             f"arch list [{' '.join(t['arch_list']) or 'none'}]"]
    if report["simulated"]:
        lines.append(f"SIMULATED devices (LOWGEAR_SIMULATE={report['simulated']}): datasheet profiles, nothing is run on them")
    lines.append("")
    lines.append("devices")
    lines += _render_devices(report["devices"])
    lines.append("")
    lines.append("attention ladder")
    lines += _render_attention(report["attention"])
    m = report["model"]
    if m is not None:
        lines.append("")
        lines += _render_model(m, report["selected_devices"])
    if m is not None and m.get("old_gpus"):
        lines += _render_old_gpus(m["old_gpus"])
    set_vars = [f"{k}={v['value']}" for k, v in report["env"].items() if v["value"] is not None]
    lines.append("")
    lines.append("environment: " + (" ".join(set_vars) if set_vars else "no lowgear/CUDA variables set"))
    for e in report["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def _render_devices(devices: list[dict]) -> list[str]:
    lines = []
    for d in devices:
        if d["kind"] == "cpu":
            lines.append("  cpu      CPU")
            lines.append(_ops_line(d))
            continue
        cc = "sm_%d%d" % tuple(d["compute_capability"])
        bw = f"{d['bandwidth'] / 1e9:.0f} GB/s" if d["bandwidth"] else "bandwidth ?"
        smi = f"nvidia-smi #{d['nvml_index']}" if d["nvml_index"] is not None else _nvml_missing()
        lines.append(f"  {d['label']:<8} {d['name']} {cc}, {_gib(d['total_memory'])} ({_gib(d['free_memory'])} free), {bw}")
        lines.append(f"           {d['uuid']}  pci {d['pci_bus_id']}  {smi}".rstrip())
        if not d["usable"]:
            lines.append(f"           UNUSABLE: {d['problem']}")
        lines.append(_ops_line(d))
        if d["usable"] and d["ops"]["triton_kernels"] and d.get("kernel_launch"):
            lines.append(f"           decode kernels: {d['kernel_launch']}")
        if d["usable"] and d.get("batched_4bit"):
            lines.append(f"           4/8-bit batched decode: {d['batched_4bit']}")
    return lines


def _render_attention(ladders: list[dict]) -> list[str]:
    lines = []
    for a in ladders:
        if a["chosen"] is None:
            lines.append(f"  {a['device']:<8} no rung: {a['error']}")
            continue
        how = "" if a.get("probed", True) else " (by capability: simulated)"
        others = ", ".join(f"{k}: {v or '-'}" for k, v in a["by_dtype"].items() if k != a["dtype"])
        lines.append(f"  {a['device']:<8} {a['dtype']} → {a['chosen']}{how}" + (f"   [{others}]" if others else ""))
        if a["error"]:
            lines.append(f"           note: {a['error']}")
        if a.get("decode_reason"):
            lines.append(f"           decode steps → {a['decode']}: {a['decode_reason']}")
        for x in a["log"]:
            if x["status"] != "not tried":
                lines.append(f"           {x['name']:<10} {x['status']:<11} {x['reason']}")
    return lines


def _render_model(m: dict, selected_devices: list[str]) -> list[str]:
    quant = ", ".join(f"{k} {_gib(v)}" for k, v in m["quant_types"].items())
    lines = [f"model {m['name'] or m['path'] or ''} ({m['format'] or 'in memory'}, {m['arch']}, {m['layers']} layers, "
             f"heads {m['heads'][0]}/{m['heads'][1]}×{m['heads'][2]}, context {_fmt_tokens(m['context'])})"]
    lines.append(f"  stored: {quant}")
    if m.get("rope"):
        lines.append(f"  rope: {m['rope']}")
    q = _render_quantization(m.get("quantization") or {})
    if q:
        lines.append(f"  quantization: {q}")
    lines.append(f"  weights on device in {m['dtype']}: {_gib(m['weight_bytes'])}; KV cache {_gib(m['cache_bytes_per_token'])} "
                 f"per token, {_gib(m['cache_bytes_per_1k_tokens'])} per 1k tokens "
                 f"({_gib(m['cache_bytes_per_token_8bit'])} per token in 8 bits, "
                 f"{_gib(m['cache_bytes_per_token_4bit'])} in 4)")
    for f in m["fits"]:
        if f["error"]:
            lines.append(f"  {f['device']:<8} alone: does not fit — {f['error']}")
        else:
            lines.append(f"  {f['device']:<8} alone: {_fmt_tokens(f['tokens'])} tokens of cache with --max-seq-len auto "
                         f"({f['auto']}); {_fmt_tokens(f['tokens_int8'])} with --kv-cache-dtype int8 or fp8_e4m3, "
                         f"{_fmt_tokens(f['tokens_int4'])} with int4")
    e = m.get("experts")
    if e:
        shared = " + a shared expert" if e["shared_expert"] else ""
        lines.append(f"  experts: top {e['top_k']} of {e['experts']}{shared} on {e['moe_layers']} layers; every expert is "
                     f"stored, a batch-1 decode step reads {_gib(e['bytes_read_per_token'])}")
    w = m["cpu_weights"]
    if w is not None:
        how = ("4-bit layers as int4" + (", the rest unpacked once at load" if w["unpack"] else "")
               if w.get("int4") else "unpacked once at load" if w["unpack"] else "packed (dequantized at every step)")
        lines.append(f"  cpu      weights {how}: {_gib(w['held_bytes'])} held — {w['why']}")
    if m["placement_error"]:
        lines.append(f"  at the model's context: {m['placement_error']}")
    p = m["placement"]
    if p is not None:
        lines.append(f"  placement on {', '.join(selected_devices)} for {_fmt_tokens(p['max_seq_len'])} tokens "
                     f"(up to {_fmt_tokens(p['kv_tokens_fit'])} fit with this split):")
        lines.extend("    " + row for row in p["text"].splitlines())
    c = m["decode_ceiling"]
    if c is not None:
        lines.append(f"  decode ceiling (bandwidth ÷ {_gib(c['bytes_per_step'])} read per step): "
                     f"{c['tokens_per_s_empty']:.0f} tok/s at empty context, {c['tokens_per_s_full']:.0f} at {_fmt_tokens(c['context'])} tokens")
    return lines


def _render_old_gpus(predictions: list[dict]) -> list[str]:
    lines = ["  on old GPUs (predicted from bytes and arithmetic, not measured; float16, context 512):"]
    for r in predictions:
        slow = next(iter(r["ms_by_path"]), "-")
        lines.append(f"    {r['gpu']:<22} batch {r['batch']:<3} ≈ {r['tokens_per_s']:7.1f} tok/s "
                     f"({r['ms_per_step']:.1f} ms/step, {r['bound']}-bound; most time in {slow})")
    return lines


def _render_quantization(q: dict) -> str:
    method = q.get("method")
    if method == "EXL2":
        if q.get("bits_per_weight") is None:
            text = "EXL2"
        else:
            (lo_name, lo), (hi_name, hi) = q["min"], q["max"]
            text = (f"EXL2, {q['bits_per_weight']:.2f} bits per weight over the layers "
                    f"(per linear {lo:.2f} {lo_name} to {hi:.2f} {hi_name})")
        if q.get("head_bits_per_weight") is not None:
            text += f", head {q['head_bits_per_weight']:.2f}"
        conv = q.get("converter") or {}
        if conv:
            made = " ".join(f"{k} {v}" for k, v in conv.items())
            text += f"; converter's settings: {made}"
        if q.get("float_linears"):
            text += f"; {q['float_linears']} linears unquantized"
        return text
    if method == "GPTQ":
        group = "one group per column" if q["group_size"] in (-1, 0) else f"group size {q['group_size']}"
        return f"GPTQ {q['bits']}-bit, {group}, {'symmetric' if q['sym'] else 'asymmetric'}, format {q['checkpoint_format']}"
    if method == "AWQ":
        return f"AWQ {q['bits']}-bit, group size {q['group_size']}, version {q['version']} (run as GPTQ, repacked at load)"
    if q.get("types"):
        mix = ", ".join(f"{k} {v:.0%}" for k, v in q["types"].items())
        text = f"{method} type mix by bytes: {mix}"
        if q.get("bits_per_weight") is not None:
            each = ", ".join(f"{k} {b:.4g}" for k, b in q["type_bits_per_weight"].items())
            text += f"; {q['bits_per_weight']:.2f} bits per weight over the packed tensors ({each})"
        return text
    return ""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="what runs on this machine: devices, attention rung, how much context fits")
    p.add_argument("--model", default=None, help="a .gguf file or Hugging Face folder to plan for")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--devices", default=None, help="devices to plan on: indexes, UUIDs, PCI bus ids or 'cpu' (comma separated)")
    p.add_argument("--dtype", default=None, help="float16 | bfloat16 | float32")
    p.add_argument("--max-seq-len", type=int, default=None, help="cache tokens to plan for (default: the model's context)")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..config import Config

    config = Config()
    if getattr(args, "dtype", None):
        config.dtype = args.dtype
    if getattr(args, "max_seq_len", None):
        config.max_seq_len = args.max_seq_len
    devices = [x.strip() for x in args.devices.split(",") if x.strip()] if getattr(args, "devices", None) else None
    report = collect(config, getattr(args, "model", None), devices)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    # a failed check (a model that does not open, a device that does not exist) is a non-zero exit
    for error in report.get("errors") or []:
        print(f"lowgear: error: {error}", file=sys.stderr)
    return 1 if report.get("errors") else 0
