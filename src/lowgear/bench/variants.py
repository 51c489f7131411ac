"""What `lowgear bench` runs: the models (presets in each weight format, or --model files), their
dtype and the attention rungs each is timed on, and the key every figure is filed under.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import LowgearError
from ..formats.spec import ModelSpec
from .models import DEFAULT_QUANTS, PRESETS, QUANTS
from .report import _dt, _names

T4_RUNG = "t4-v100"  # the forced rung: float16, no flash_attn, chosen as for an sm_75 device

_QUANT_ALIASES = {"fp16": "float", "f16": "float", "q4": "q4_0"}


@dataclasses.dataclass
class Variant:
    """One loaded model: which weights, in which dtype, timed on which rungs."""

    label: str  # preset name or model path
    spec: ModelSpec
    quant: str  # "float", "q4_0", or "file" for --model
    dtype: torch.dtype
    rungs: list[str]
    path: str | None = None


def plan_variants(args, device: torch.device) -> list[Variant]:
    """The models to load (a preset in each --quant, or each --model) and the rungs each is timed on."""
    gpu_dtype = torch.float16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, args.dtype) if args.dtype else gpu_dtype
    rungs = _rung_names(args.rungs, device)
    plain = [r for r in rungs if r != T4_RUNG]
    t4 = [T4_RUNG] if T4_RUNG in rungs else []
    out: list[Variant] = []
    if args.model:
        from ..config import Config

        models = [(path, Config(path).spec, ["file"], path) for path in _names(args.model)]
    else:
        presets = _names(args.preset) or (["tiny"] if device.type == "cpu" else ["llama3.2-1b"])
        for p in presets:
            if p not in PRESETS:
                raise LowgearError(f"unknown preset {p!r}: choose from {', '.join(PRESETS)}")
        quants = [_QUANT_ALIASES.get(q.lower(), q.lower()) for q in _names(args.quant)] or list(DEFAULT_QUANTS)
        for q in quants:
            if q not in QUANTS:
                raise LowgearError(f"unknown --quant {q!r}: choose from {', '.join(QUANTS)}")
        models = [(p, PRESETS[p], quants, None) for p in presets]
    for label, spec, quants, path in models:
        for q in quants:
            if dtype == torch.float16:
                out.append(Variant(label, spec, q, dtype, plain + t4, path))
            else:  # the T4/V100 rung runs in float16, so it needs its own load
                if plain:
                    out.append(Variant(label, spec, q, dtype, plain, path))
                if t4:
                    out.append(Variant(label, spec, q, torch.float16, t4, path))
    return out


def _rung_names(text, device: torch.device) -> list[str]:
    from ..config import BACKEND_NAMES

    names = _names(text)
    if not names or names == ["all"]:
        # Triton on the CPU is its interpreter: a test tool, not something to time.
        names = [n for n in BACKEND_NAMES if device.type == "cuda" or n != "triton"] + [T4_RUNG]
    for n in names:
        if n not in BACKEND_NAMES and n != T4_RUNG:
            raise LowgearError(f"unknown rung {n!r}: choose from {', '.join(BACKEND_NAMES)}, {T4_RUNG} or all")
    return names


def _what(v: Variant, kind: str, batch: int, context: int, rung: str | None = None, engine: str = "lowgear") -> dict:
    return {"engine": engine, "model": v.label, "shape": v.spec.name or v.label, "quant": v.quant, "dtype": _dt(v.dtype),
            "rung": rung, "kind": kind, "batch": batch, "context": context}
