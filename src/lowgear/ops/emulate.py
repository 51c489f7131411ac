"""Running a newer GPU as an sm_70 / sm_75 one does (LOWGEAR_EMULATE_SM=70 or 75), to measure an old
card's code paths and arithmetic on the GPU at hand.

Two parts. `platform/hardware.py` reports the emulated compute capability for every real CUDA device
(its name says "as sm_75"), so every decision made from it follows: the attention ladder, the matmul
routes (no tl.dot tensor-core kernel below sm_80), no programmatic dependent launch, torch's sdpa
without its sm_80+ kernels. And `install` (called when `lowgear.ops` is imported, before the
process compiles any Triton kernel: `install_from_env`) makes Triton compile for the emulated target: its driver reports that
target, so the kernels are lowered as for that card (tl.dot as FMAs, no cp.async or wgmma), and a
ptxas wrapper assembles that PTX for the real GPU's architecture (PTX is forward compatible; the
machine code for sm_75 is not), so the sm_75 code runs on the newer card. The FP32-FMA-per-byte
balance of an H100 (~20 FLOP/B) is near a T4's (~25), so arithmetic-bound paths keep their shape.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile

_INSTALLED: dict[str, object] = {}

_WRAPPER = """#!{python}
import os, sys
real, target, native = {real!r}, {target!r}, {native!r}
args = [a.replace("sm_" + target, "sm_" + native) if "sm_" + target in a else a for a in sys.argv[1:]]
os.execv(real, [real] + args)
"""


def ptxas_wrapper(real: str, target: str, native: str, folder: str | None = None) -> str:
    """A ptxas that assembles sm_{target} PTX for sm_{native} (only the arch arguments change)."""
    folder = folder or tempfile.mkdtemp(prefix="lowgear-ptxas-")
    path = os.path.join(folder, "ptxas")
    with open(path, "w") as f:
        f.write(_WRAPPER.format(python=sys.executable, real=real, target=target, native=native))
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC | stat.S_IXGRP | stat.S_IXOTH)
    return path


def install(emulated: tuple[int, int], native: tuple[int, int]) -> None:
    """Make this process's Triton compile for `emulated` and assemble for `native` (once; before any
    kernel is compiled, or kernels compiled earlier keep their target)."""
    if _INSTALLED:
        return
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    target, arch = f"{emulated[0]}{emulated[1]}", f"{native[0]}{native[1]}"
    real = knobs.nvidia.ptxas.path
    wrapper = ptxas_wrapper(real, target, arch)
    os.environ["TRITON_PTXAS_PATH"] = wrapper
    try:
        knobs.nvidia.ptxas = wrapper
    except Exception:  # older knob objects read the variable above
        pass
    CudaDriver.get_current_target = lambda self: GPUTarget("cuda", int(target), 32)
    _INSTALLED.update(target=target, native=arch, ptxas=wrapper, real=real)


def installed() -> dict:
    return dict(_INSTALLED)


def install_from_env() -> None:
    """`install` for the first real GPU that LOWGEAR_EMULATE_SM runs as an older one (none: nothing)."""
    from ..platform import hardware
    from .dispatch import triton_missing

    for d in hardware.list_devices():
        if d.kind == "cuda" and d.native_capability is not None and triton_missing() is None:
            install(d.compute_capability, d.native_capability)
            return
