"""`lowgear doctor`'s model section: what a model costs and where it goes on the chosen devices.

`_model` gathers it as plain data: the model's shape and quantization (GGUF type mix, GPTQ / AWQ bits
and group size, EXL2 bits per weight and their per-layer range), its bytes, the cache cost, the tokens
that fit on each device alone, the placement over the chosen devices, a decode ceiling from their
bandwidth, what a CPU does with packed weights, and the T4 / V100 prediction. cli/doctor.py prints it.
"""

from __future__ import annotations

import os

from ..errors import LowgearError
from ..formats.blocks import QUANT_FORMATS
from ..platform import hardware, placement
from ..platform.dtypes import common_dtype, dtype_bytes, dtype_name


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
    from ..ops.matmul import repack  # GPUs rewrite GGUF linears at load: planned at their held bytes

    held = repack.gpu_held_bytes if any(d.kind != "cpu" for d in usable) else None
    per_layer, other, qtypes = placement.device_bytes(source, spec, dtype_bytes(dtype), held)
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
        row = _fit_alone(spec, d, per_layer, other, kv_layer, kv_token, dtype_bytes(dtype), reserve)
        out["fits"].append(row)
        if d.kind == "cpu":
            out["cpu_weights"] = _cpu_weights(source, cpu_mode, dtype_bytes(dtype), kv_token * row["tokens"])
    target = max_seq_len or spec.max_position_embeddings
    plan, out["placement_error"] = _plan(spec, per_layer, other, usable, kv_layer, target, reserve)
    if plan is not None:
        out["placement"] = _placement(plan)
        out["decode_ceiling"] = _decode_ceiling(plan, read_layer, other, kv_layer, spec)
    out["old_gpus"] = _old_gpus(source)
    return out


def _fit_alone(spec, d, per_layer, other, kv_layer, kv_token, elt: int, reserve) -> dict:
    """The cache tokens that fit with the model on device `d` alone (float, int8 and int4 cache), or why none do."""
    row = {"device": d.label, "name": d.name, "tokens": 0, "tokens_int8": 0, "tokens_int4": 0, "error": None, "auto": None}
    try:
        plan = placement.plan(spec, per_layer, other, [d], kv_layer, "auto", reserve)
        row["tokens"] = plan.max_seq_len
        cap = placement.cpu_auto_cap(spec, [d], kv_token)
        row["auto"] = cap[1] if cap else "the largest cache free device memory holds"
        for kind in ("int8", "int4"):
            row[f"tokens_{kind}"] = placement.plan(
                spec, per_layer, other, [d], placement.kv_bytes_per_token_per_layer(spec, elt, kind),
                "auto", reserve).max_seq_len
    except LowgearError as exc:
        row["error"] = str(exc)
    return row


def _plan(spec, per_layer, other, usable, kv_layer, target, reserve):
    """(the placement for `target` tokens, None), else (the largest that fits or None, why `target` does not)."""
    try:
        return placement.plan(spec, per_layer, other, usable, kv_layer, target, reserve), None
    except LowgearError as exc:
        try:
            return placement.plan(spec, per_layer, other, usable, kv_layer, "auto", reserve), str(exc)
        except LowgearError:
            return None, str(exc)


def _placement(plan) -> dict:
    return {
        "max_seq_len": plan.max_seq_len,
        "kv_tokens_fit": plan.kv_tokens_fit,
        "devices": [
            {"device": p.label, "name": p.name, "layers": [p.layers[0], p.layers[-1]] if p.layers else [],
             "embed": p.holds_embed, "head": p.holds_head, "weights": p.weights, "cache": p.cache, "budget": p.budget}
            for p in plan.per_device if p.layers or p.holds_embed or p.holds_head
        ],
        "text": plan.describe(),
    }


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
