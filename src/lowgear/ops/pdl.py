"""Programmatic dependent launch (PDL): a decode kernel starts while the one before it finishes.

On sm_90+ a kernel launched with the programmatic-serialization attribute (`launch_pdl`) may be
placed as soon as every program of the kernel before it has signalled
`griddepcontrol.launch_dependents`; it must then run `griddepcontrol.wait` (which returns once that
kernel has completed and its writes are visible) before it reads anything an earlier kernel wrote,
or writes anything an earlier kernel may still read. Work before the wait may only touch memory no
kernel of the step writes: the weights.

Every kernel of the CUDA decode step calls `wait` where it first needs an earlier kernel's output
(the GEMVs after issuing their first weight loads, RMSNorm after loading its weight, the others at
their start). Where a kernel lets the next one in is the launch's `PDL` constexpr (0: a plain
launch, compiled without any griddepcontrol instruction, as sm < 90 and the interpreter need):

    LOOP  (1)  the split-K GEMVs after their main loop, the other kernels at exit
    WAIT  (2)  every kernel right after its wait: the next kernel is resident for all of this one
    START (3)  every kernel just before its wait: kernels are placed as soon as the one before is resident

Every mode is safe: a kernel's wait returns only once the kernel before it has completed, and that
kernel completed only after its own wait, so an earlier kernel's writes are visible to every later
one. The rule the kernels must keep: nothing an earlier kernel wrote is read before the wait,
including by loads Triton's software pipeliner hoists into a loop's prologue, so a pipelined
(tl.dot) kernel waits before its loop (gptq_mma.py); tests/test_pdl.py reads every kernel's PTX
for it. The default, `auto`, is WAIT for a launch over one token row and LOOP for more.
`Config.no_pdl` / `Config.pdl_release` (or LOWGEAR_NO_PDL=1 / LOWGEAR_PDL_RELEASE) set them; a model
load hands its config's switches to `configure`, kernels launched with no model loaded take a
default Config's.

why: docs/decisions/003-pdl-release.md
"""

from __future__ import annotations

import torch

from ..config import Config
from ..platform import env, hardware

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # no triton, or one without griddepcontrol: PDL stays off
    triton = None

_CAPABILITY: dict[int, tuple[int, int] | None] = {}  # per CUDA index, looked up once

LOOP, WAIT, START = 1, 2, 3
AUTO = "auto"  # WAIT at one token row, LOOP above (`release_mode`)
RELEASE_MODES = {AUTO: None, "loop": LOOP, "wait": WAIT, "start": START}
DEFAULT_RELEASE = AUTO
_SWITCHES: list[tuple[bool, str]] = []  # (off, release name) that `configure` was given; empty: read per launch


def configure(config: Config | None) -> None:
    """Take `config`'s PDL switches (an unknown release name is a ConfigError here); None goes back to a
    default Config's, read at each launch."""
    _SWITCHES[:] = [(config.pdl_off(), config.pdl_release_name())] if config is not None else []


def _off() -> bool:
    return _SWITCHES[0][0] if _SWITCHES else Config().pdl_off()


def release_name() -> str:
    """The release mode's name in force (config.pdl_release, LOWGEAR_PDL_RELEASE, else DEFAULT_RELEASE)."""
    return _SWITCHES[0][1] if _SWITCHES else Config().pdl_release_name()


def release_mode(rows: int | None = None) -> int:
    """The `PDL` constexpr of an sm_90+ launch over `rows` token rows (None: unknown, taken as many):
    the mode `release_name` names, `auto` resolved by the row count."""
    mode = RELEASE_MODES[release_name()]
    if mode is None:
        return WAIT if rows == 1 else LOOP
    return mode


def decision(capability: tuple[int, int] | None) -> tuple[bool, str]:
    """(on, why) for a CUDA device of this compute capability: what `lowgear doctor` prints."""
    if _off():
        return False, "plain launches (config.no_pdl or LOWGEAR_NO_PDL=1)"
    if capability is None or tuple(capability) < (9, 0):
        return False, "plain launches (programmatic dependent launch needs sm_90+)"
    if triton is None:
        return False, "plain launches (this Triton has no griddepcontrol)"
    name = release_name()
    how = " = wait at one token row, loop above" if name == AUTO else ""
    return True, ("programmatic dependent launch (each kernel placed while the one before it finishes; "
                  f"release: {name}{how})")


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` are compiled with the wait and launched with `launch_pdl`."""
    if device.type != "cuda" or env.flag("TRITON_INTERPRET"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = hardware.compute_capability(torch.device("cuda", index))
    return decision(_CAPABILITY[index])[0]


def launch(device: torch.device, rows: int | None = None) -> dict:
    """Keyword arguments for a kernel launch over `rows` token rows (the decode batch): the `PDL`
    constexpr (0, or the release mode) and Triton's `launch_pdl` option."""
    return {"PDL": release_mode(rows), "launch_pdl": True} if enabled(device) else {"PDL": 0}


if triton is not None:

    @triton.jit
    def wait(PDL: tl.constexpr):
        """Block until the kernel before this one has completed and its writes are visible (no-op
        unless PDL); in the WAIT and START modes this also lets the next kernel be placed."""
        if PDL == 3:  # START
            gdc_launch_dependents()
        if PDL:
            gdc_wait()
        if PDL == 2:  # WAIT
            gdc_launch_dependents()

    @triton.jit
    def release(PDL: tl.constexpr):
        """LOOP mode: let the next kernel be placed once every program got here (or exited)."""
        if PDL == 1:  # LOOP
            gdc_launch_dependents()

    @triton.jit
    def prefetch_l2(ptrs, PDL: tl.constexpr):
        """Ask L2 for the 128-byte lines holding `ptrs` (no registers, no wait; no-op unless PDL)."""
        if PDL:
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                                      dtype=tl.int32, is_pure=False, pack=1)
