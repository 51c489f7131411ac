"""The ops a model block calls, bound once per device: torch or Triton, from one probed decision.

`triton_eligibility(device)` answers "may Triton kernels run on this device?" once per device and
process: a CUDA device of compute capability 7.0 or newer, triton importable, TRITON_INTERPRET
unset, and a tiny real kernel launch that agrees with torch; when not, the reason. `ops_for(device)`
turns the answer into an `Ops`: the functions a block calls (rms_norm with the fused residual add,
RoPE with the KV-cache write, silu-and-multiply) and the kernel hook a linear layer gets at load.
Both sets keep one contract, so the CPU step and the CUDA step are the same block code. The CPU
always gets the torch ops; tests build Triton ops on the CPU (the interpreter) with `triton_ops()`.
The model resolves its `Ops` per device at load and holds it: nothing is decided per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import install_hint
from ..platform import env

MIN_COMPUTE_CAPABILITY = (7, 0)  # Triton's floor


@dataclass(frozen=True)
class Eligibility:
    triton: bool  # Triton kernels may run on the device
    reason: str
    probed: bool = False  # a kernel launch on the device decided it (not capability alone)


@dataclass(frozen=True)
class Ops:
    """One device's implementations. rms_norm(x, w, eps, residual=None) -> normed, or with residual
    (normed x + residual, the sum written into residual); rope_kv_(q, k, v, positions, cos, sin, style,
    k_cache, v_cache, slot_mapping) rotates q/k in place and writes k/v to the cache; silu_mul(gate_up)
    -> silu(gate) * up, gelu_mul(gate_up) -> gelu_tanh(gate) * up (GeGLU); linear_kernel(module) -> a
    QuantLinear kernel hook, or None for torch's; experts_kernel(moe) -> a mixture-of-experts layer's kernel
    hook (ops/matmul/moe_gemv.py), or None for its grouped torch path."""

    name: str  # "torch" or "triton"
    eligibility: Eligibility
    rms_norm: Callable
    rope_kv_: Callable
    silu_mul: Callable
    linear_kernel: Callable
    gelu_mul: Callable
    experts_kernel: Callable


def triton_missing() -> str | None:
    """Why triton cannot be imported; None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc}): {install_hint('triton')}"
    return None


def probe_launch(device) -> str:
    """Launch the fused RMSNorm kernel once on `device` and check it against float64 torch; raises on failure."""
    from .norm import rms_norm_ref, rms_norm_triton

    dev = device.torch_device
    gen = torch.Generator().manual_seed(0)
    x, r = (torch.randn(3, 96, generator=gen).to(dev, torch.float16) for _ in range(2))
    w = (1 + 0.1 * torch.randn(96, generator=gen)).to(dev)
    with torch.cuda.device(dev):  # Triton launches on the current device
        out, h = rms_norm_triton(x, w, 1e-5, residual=r.clone())
    ref_out, ref_h = rms_norm_ref(x.double(), w.double(), 1e-5, r.double(), compute_dtype=torch.float64)
    err = max((out.double() - ref_out).abs().max().item(), (h.double() - ref_h).abs().max().item())
    if not err <= 1e-2:
        raise RuntimeError(f"the rms_norm kernel disagrees with torch (max error {err:.3g})")
    return f"probe launch ok on {device.sm}"


def decide(device, probe: Callable = probe_launch) -> Eligibility:
    """The decision for `device` (a hardware.DeviceInfo), uncached; `probe(device)` launches a kernel."""
    if device.kind != "cuda":
        return Eligibility(False, "the CPU runs the torch ops (Triton kernels need a CUDA GPU)")
    cc = device.compute_capability or (0, 0)
    if cc < MIN_COMPUTE_CAPABILITY:
        need = MIN_COMPUTE_CAPABILITY
        return Eligibility(False, f"Triton kernels need compute capability {need[0]}.{need[1]} or newer "
                                  f"(device is sm_{cc[0]}{cc[1]})")
    missing = triton_missing()
    if missing:
        return Eligibility(False, missing)
    if device.simulated:
        return Eligibility(True, f"simulated {device.sm}: by compute capability and triton's presence, not probed")
    if env.flag("TRITON_INTERPRET"):
        return Eligibility(False, "TRITON_INTERPRET=1 is set, so Triton would run on the CPU; unset it to use the GPU")
    try:
        return Eligibility(True, probe(device), probed=True)
    except Exception as exc:  # a broken Triton install must leave the torch ops, not crash the load
        return Eligibility(False, f"probe launch failed: {type(exc).__name__}: {exc}".strip(), probed=True)


_DECISIONS: dict[tuple, Eligibility] = {}


def triton_eligibility(device) -> Eligibility:
    """`decide(device)`, once per device and process (and per TRITON_INTERPRET setting)."""
    key = (device.label, device.compute_capability, device.simulated, device.name, env.flag("TRITON_INTERPRET"))
    if key not in _DECISIONS:
        _DECISIONS[key] = decide(device)
    return _DECISIONS[key]


def clear_cache() -> None:
    _DECISIONS.clear()


def _no_kernel(module) -> None:
    return None


def torch_ops(eligibility: Eligibility | None = None) -> Ops:
    from .act import gelu_mul_ref, silu_mul_ref
    from .norm import rms_norm_torch
    from .rope import rope_kv_torch

    eligibility = eligibility or Eligibility(False, "torch ops asked for")
    return Ops("torch", eligibility, rms_norm_torch, rope_kv_torch, silu_mul_ref, _no_kernel, gelu_mul_ref, _no_kernel)


def _triton_linear_kernel(module):
    from . import matmul

    return matmul.kernel_for(module) if module.packed else matmul.float_kernel_for(module)


def _triton_experts_kernel(moe):
    from .matmul.moe_gemv import moe_kernel_for

    return moe_kernel_for(moe)


def triton_ops(eligibility: Eligibility | None = None) -> Ops:
    """The Triton ops (also what tests run on the CPU under TRITON_INTERPRET=1)."""
    from .act import gelu_mul_triton, silu_mul_triton
    from .norm import rms_norm_triton
    from .rope import rope_kv_triton

    eligibility = eligibility or Eligibility(True, "Triton ops asked for")
    return Ops("triton", eligibility, rms_norm_triton, rope_kv_triton, silu_mul_triton, _triton_linear_kernel,
               gelu_mul_triton, _triton_experts_kernel)


def ops_for(device) -> Ops:
    """The ops `device` (a hardware.DeviceInfo) runs: Triton's where triton_eligibility allows, else torch's."""
    eligibility = triton_eligibility(device)
    return triton_ops(eligibility) if eligibility.triton else torch_ops(eligibility)
