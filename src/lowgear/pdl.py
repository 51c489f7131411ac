"""Programmatic dependent launch (PDL): a decode kernel starts while the one before it finishes.

A batch-1 decode step is ~300 short kernels in a row (an 8B model: 9 a layer). Launched the plain
way, each waits for the previous one to finish and flush before its first program is even placed
on an SM, and its last programs run alone while the rest of the GPU idles: on an H100 that ramp and
drain cost several microseconds a kernel, as much as a small GEMV's whole read. On sm_90+ a kernel
launched with the programmatic-serialization attribute (`launch_pdl`) may be placed as soon as
every program of the kernel before it has signalled `griddepcontrol.launch_dependents`; it must then
run `griddepcontrol.wait` (which returns once that kernel has completed and its writes are visible)
before it reads anything an earlier kernel wrote, or writes anything an earlier kernel may still
read. Work before the wait may only touch memory no kernel of the step writes: the weights.

Every kernel of the CUDA decode step calls `wait` where it first needs an earlier kernel's output
(the GEMVs after issuing their first weight loads, the others at their start). The split-K GEMVs
also `release` their dependents once their main loop is done, so the next kernel is placed and
starts its own weight loads while the GEMV's last programs add the partials; the other kernels
release at exit. Releasing right after the wait instead (the next kernel resident for the whole
of this one) was measured slightly faster (3.14 against 3.16 ms, 8B GPTQ batch 1) but gave wrong
tokens in a CUDA-graphed batch-8 decode on the H100 (benchmarks/results/h100-session4/); releasing
after the main loop, or only at exit, gave the same tokens as plain launches. Kernels take the choice
as a constexpr (`PDL`): compiled without it, for sm < 90 or the interpreter, they hold no
griddepcontrol instruction. LOWGEAR_NO_PDL=1 turns it off (the benchmarks measure both ways).
"""

from __future__ import annotations

import torch

from . import env, hardware

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # no triton, or one without griddepcontrol: PDL stays off
    triton = None

_CAPABILITY: dict[int, tuple[int, int] | None] = {}  # per CUDA index, looked up once


def decision(capability: tuple[int, int] | None) -> tuple[bool, str]:
    """(on, why) for a CUDA device of this compute capability: what `lowgear doctor` prints."""
    if env.flag("LOWGEAR_NO_PDL"):
        return False, "plain launches (LOWGEAR_NO_PDL=1)"
    if capability is None or tuple(capability) < (9, 0):
        return False, "plain launches (programmatic dependent launch needs sm_90+)"
    if triton is None:
        return False, "plain launches (this Triton has no griddepcontrol)"
    return True, "programmatic dependent launch (each kernel placed while the one before it finishes)"


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` are compiled with the wait and launched with `launch_pdl`."""
    if device.type != "cuda" or env.flag("TRITON_INTERPRET"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = hardware.compute_capability(torch.device("cuda", index))
    return decision(_CAPABILITY[index])[0]


def launch(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch: the `PDL` constexpr and Triton's `launch_pdl` option."""
    on = enabled(device)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


if triton is not None:

    @triton.jit
    def wait(PDL: tl.constexpr):
        """Block until the kernel before this one has completed and its writes are visible (no-op unless PDL)."""
        if PDL:
            gdc_wait()

    @triton.jit
    def release(PDL: tl.constexpr):
        """Let the next kernel be placed once every program got here (or exited; no-op unless PDL)."""
        if PDL:
            gdc_launch_dependents()
