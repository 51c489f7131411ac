"""Triton kernels of the triton rung: paged decode (split-K, no `tl.dot`) and paged prefill.

The kernel modules import triton at their top, so nothing imports them at lowgear import time:
`attention/triton.py` loads them lazily through `load()`, which also re-imports them when
TRITON_INTERPRET changed since they were first imported (`@triton.jit` decides at definition time
whether a kernel is compiled or interpreted).
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = ("paged_decode", "paged_prefill")


def load(interpret: bool) -> tuple[ModuleType, ...]:
    """The kernel modules, defined for the interpreter when `interpret`, else for the GPU."""
    loaded = []
    for name in _MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        if module.INTERPRETED != interpret:
            module = importlib.reload(module)
        loaded.append(module)
    return tuple(loaded)
