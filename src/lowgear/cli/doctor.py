"""`lowgear doctor`: what will run on this machine, and how much context fits, on one screen.

`collect` gathers the facts as plain data (the torch build and its arch list, each device and its
ops — Triton kernels or torch, and why (ops/dispatch.py) —, every attention rung's decision with its
reason, the environment variables in force and, given a model, its quantization (GGUF type mix,
GPTQ bits and group size, EXL2 bits per weight and their per-layer range), its bytes, cache cost,
the tokens that fit per device, the placement and a decode ceiling from the device's bandwidth);
`render` prints them; `--json` prints `collect`'s dict. Under LOWGEAR_SIMULATE the same report
describes a simulated machine, which is how "what would happen on a T4" is answered (and tested)
without one.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from ..platform import env, hardware, placement
from ..ops import pdl
from ..ops.dispatch import triton_eligibility
from ..platform.dtypes import choose_dtype, common_dtype, dtype_bytes, dtype_name
from ..errors import LowgearError, MissingDependencyError, require
from ..formats.blocks import QUANT_FORMATS

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


def _fmt_tokens(n: int) -> str:
    return f"{n:,}"


_FLOAT_TYPES = ("F32", "F16", "BF16", "?")


def _quantization(source, qtypes, fmt: str | None) -> dict:
    """The weights' quantization in brief: the reader's own summary (HF folders), else the GGUF type mix."""
    summary = getattr(source, "quantization", None)
    q = summary() if callable(summary) else {"method": None}
    if q.get("method") is None:
        total = sum(qtypes.values()) or 1
        packed = {k: v / total for k, v in sorted(qtypes.items(), key=lambda kv: -kv[1]) if k not in _FLOAT_TYPES}
        if packed:
            q = {"method": "GGUF" if fmt in ("gguf", None) else fmt, "types": packed}
            q.update(_gguf_bits(qtypes))
    return q


def _gguf_bits(qtypes) -> dict:
    """Bits per weight of each GGUF block format present (its format's fact) and over all of them (by weights)."""
    bpw = {k: QUANT_FORMATS[k].bits_per_weight for k in qtypes if k in QUANT_FORMATS}
    weights = sum(8 * qtypes[k] / b for k, b in bpw.items())
    if not weights:
        return {}
    return {"type_bits_per_weight": bpw, "bits_per_weight": 8 * sum(qtypes[k] for k in bpw) / weights}


def _collapse_exl2(qtypes) -> dict:
    """EXL2 layers each have their own bits per weight (EXL2_4.13bpw, ...): one "EXL2" entry for the stored line."""
    out: dict = {}
    for k, v in qtypes.items():
        key = "EXL2" if k.startswith("EXL2_") else k
        out[key] = out.get(key, 0) + v
    return out


def _model(source, path, spec_devices, requested_dtype, reserve, max_seq_len, cpu_mode: str = "auto") -> dict:
    spec = source.spec
    usable = [d for d in spec_devices if hardware.torch_arch_supported(d)]
    dtype = common_dtype(usable or [hardware.cpu_device()], requested_dtype)
    per_layer, other, qtypes = placement.device_bytes(source, spec, dtype_bytes(dtype))
    kv_token = placement.kv_bytes_per_token(spec, dtype_bytes(dtype))
    kv_layer = placement.kv_bytes_per_token_per_layer(spec, dtype_bytes(dtype))
    weights = sum(per_layer) + sum(other.values())
    fmt = "gguf" if path and os.path.isfile(path) else ("hf" if path else None)
    out: dict = {
        "path": os.fspath(path) if path else None,
        "format": fmt,
        "name": spec.name,
        "arch": spec.arch,
        "layers": spec.num_layers,
        "heads": [spec.num_heads, spec.num_kv_heads, spec.head_dim],
        "context": spec.max_position_embeddings,
        "rope": _rope_summary(spec),
        "quant_types": dict(sorted(_collapse_exl2(qtypes).items(), key=lambda kv: -kv[1])),
        "quantization": _quantization(source, qtypes, fmt),
        "dtype": dtype_name(dtype),
        "weight_bytes": weights,
        "cache_bytes_per_token": kv_token,
        "cache_bytes_per_1k_tokens": kv_token * 1000,
        "cache_bytes_per_token_8bit": placement.kv_bytes_per_token(spec, dtype_bytes(dtype), "int8"),
        "cache_bytes_per_token_4bit": placement.kv_bytes_per_token(spec, dtype_bytes(dtype), "int4"),
        "fits": [],
        "placement": None,
        "placement_error": None,
        "decode_ceiling": None,
        "cpu_weights": None,
        "experts": None,
    }
    read_layer = per_layer
    if spec.moe_layers:
        read_layer = placement.decode_read_bytes(source, spec, dtype_bytes(dtype), per_layer)
        out["experts"] = {"experts": spec.num_experts, "top_k": spec.num_experts_per_tok, "moe_layers": len(spec.moe_layers),
                          "shared_expert": bool(spec.shared_expert_intermediate_size),
                          "bytes_read_per_token": sum(read_layer) + (other["lm_head"] or other["embed"]) + other["norm"]}
    for d in spec_devices:
        row = {"device": d.label, "name": d.name, "tokens": 0, "tokens_int8": 0, "tokens_int4": 0, "error": None, "auto": None}
        try:
            plan = placement.plan(spec, per_layer, other, [d], kv_layer, "auto", reserve)
            row["tokens"] = plan.max_seq_len
            cap = placement.cpu_auto_cap(spec, [d], kv_token)
            row["auto"] = cap[1] if cap else "the largest cache free device memory holds"
            for kind in ("int8", "int4"):
                row[f"tokens_{kind}"] = placement.plan(
                    spec, per_layer, other, [d], placement.kv_bytes_per_token_per_layer(spec, dtype_bytes(dtype), kind),
                    "auto", reserve).max_seq_len
        except LowgearError as exc:
            row["error"] = str(exc)
        out["fits"].append(row)
        if d.kind == "cpu":
            out["cpu_weights"] = _cpu_weights(source, cpu_mode, dtype_bytes(dtype), kv_token * row["tokens"])
    target = max_seq_len or spec.max_position_embeddings
    plan = None
    try:
        plan = placement.plan(spec, per_layer, other, usable, kv_layer, target, reserve)
    except LowgearError as exc:
        out["placement_error"] = str(exc)
        try:
            plan = placement.plan(spec, per_layer, other, usable, kv_layer, "auto", reserve)
        except LowgearError:
            plan = None
    if plan is not None:
        out["placement"] = {
            "max_seq_len": plan.max_seq_len,
            "kv_tokens_fit": plan.kv_tokens_fit,
            "devices": [
                {"device": p.label, "name": p.name, "layers": [p.layers[0], p.layers[-1]] if p.layers else [],
                 "embed": p.holds_embed, "head": p.holds_head, "weights": p.weights, "cache": p.cache, "budget": p.budget}
                for p in plan.per_device if p.layers or p.holds_embed or p.holds_head
            ],
            "text": plan.describe(),
        }
        out["decode_ceiling"] = _decode_ceiling(plan, read_layer, other, kv_layer, spec)
    out["old_gpus"] = _old_gpus(source)
    return out


def _old_gpus(source) -> list[dict]:
    """Predicted decode speed of this model on a T4 and a V100 (bench/costmodel.py): bytes and arithmetic."""
    from ..bench.costmodel import old_gpu_predictions

    try:
        return old_gpu_predictions(source)
    except LowgearError:  # a tensor type the model does not know: no prediction, not a failed doctor
        return []


def _cpu_weights(source, mode: str, elt: int, cache_bytes: int) -> dict:
    """What a CPU does with the packed weights (the same call model/load.py makes), for the cache it would hold."""
    from ..ops.matmul import cpu_int4

    c = placement.cpu_weights(source, mode, elt, cache_bytes, int4_bytes=cpu_int4.sizer())
    return {"unpack": c.unpack, "int4": c.int4, "int4_layers": c.int4_layers, "mode": c.mode, "why": c.why,
            "packed_bytes": c.packed_bytes,
            "unpacked_bytes": c.unpacked_bytes, "held_bytes": c.held_bytes, "cache_bytes": cache_bytes}


def _decode_ceiling(plan, per_layer, other, kv_layer, spec) -> dict | None:
    """Tokens/s for one stream if each step only had to read its bytes once: Σ over devices of bytes ÷ bandwidth
    (`per_layer`: the bytes a step reads, a mixture-of-experts layer's chosen experts only)."""
    devices = plan.devices
    if any(devices[i].bandwidth is None for i in plan.used_devices):
        return None
    head = other["lm_head"] or other["embed"]  # tied: the embedding is read as lm_head

    def seconds(context: int) -> float:
        t = 0.0
        for i, d in enumerate(devices):
            layers = [j for j, x in enumerate(plan.layer_device) if x == i]
            read = sum(per_layer[j] for j in layers) + context * kv_layer * len(layers)
            if i == plan.head_device:
                read += head + other["norm"]
            if read:
                t += read / d.bandwidth
        return t

    ctx = plan.max_seq_len
    empty, full = seconds(0), seconds(ctx)
    bytes_step = sum(per_layer) + head + other["norm"]
    return {"tokens_per_s_empty": 1 / empty, "tokens_per_s_full": 1 / full, "context": ctx, "bytes_per_step": bytes_step}


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
    for d in report["devices"]:
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
    lines.append("")
    lines.append("attention ladder")
    for a in report["attention"]:
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
    m = report["model"]
    if m is not None:
        lines.append("")
        quant = ", ".join(f"{k} {_gib(v)}" for k, v in m["quant_types"].items())
        lines.append(f"model {m['name'] or m['path'] or ''} ({m['format'] or 'in memory'}, {m['arch']}, {m['layers']} layers, "
                     f"heads {m['heads'][0]}/{m['heads'][1]}×{m['heads'][2]}, context {_fmt_tokens(m['context'])})")
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
            lines.append(f"  placement on {', '.join(report['selected_devices'])} for {_fmt_tokens(p['max_seq_len'])} tokens "
                         f"(up to {_fmt_tokens(p['kv_tokens_fit'])} fit with this split):")
            lines.extend("    " + row for row in p["text"].splitlines())
        c = m["decode_ceiling"]
        if c is not None:
            lines.append(f"  decode ceiling (bandwidth ÷ {_gib(c['bytes_per_step'])} read per step): "
                         f"{c['tokens_per_s_empty']:.0f} tok/s at empty context, {c['tokens_per_s_full']:.0f} at {_fmt_tokens(c['context'])} tokens")
    if m is not None and m.get("old_gpus"):
        lines.append("  on old GPUs (predicted from bytes and arithmetic, not measured; float16, context 512):")
        for r in m["old_gpus"]:
            slow = next(iter(r["ms_by_path"]), "-")
            lines.append(f"    {r['gpu']:<22} batch {r['batch']:<3} ≈ {r['tokens_per_s']:7.1f} tok/s "
                         f"({r['ms_per_step']:.1f} ms/step, {r['bound']}-bound; most time in {slow})")
    set_vars = [f"{k}={v['value']}" for k, v in report["env"].items() if v["value"] is not None]
    lines.append("")
    lines.append("environment: " + (" ".join(set_vars) if set_vars else "no lowgear/CUDA variables set"))
    for e in report["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def _rope_summary(spec) -> str | None:
    """A line on RoPE where it is not the plain whole-head kind (partial rotary, LongRoPE), else None."""
    parts = []
    if spec.rotary_dim is not None:
        parts.append(f"rotates {spec.rotary_dim} of {spec.head_dim} dims a head")
    scaling = spec.rope_scaling or {}
    if scaling.get("type") == "longrope":
        original = scaling["original_max_position_embeddings"]
        parts.append(f"LongRoPE: long factors when the cache holds more than {_fmt_tokens(original)} tokens, short "
                     f"ones otherwise (--max-seq-len), cos/sin scaled by {scaling['attention_factor']:.4f}")
    return "; ".join(parts) or None


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
