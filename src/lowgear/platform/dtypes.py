"""The dtype policy: which floating type weights, activations and the cache use on a device.

float32 on the CPU (half-precision matmuls there are slow or emulated); float16 on GPUs below
sm_80, which have no bfloat16 tensor cores (a bfloat16 checkpoint is converted, and `check_finite`
catches the rare activation that overflows float16's range); bfloat16 on sm_80 and newer. A dtype
asked for in the config or LOWGEAR_DTYPE overrides the default, and is refused where the device
cannot do it.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, LowgearError

NAMES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}


class NonFiniteError(LowgearError):
    """Activations overflowed to inf/nan (float16's range is ±65504)."""


def parse_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in NAMES.values():
            raise ConfigError(f"unsupported dtype {value}: choose one of {', '.join(NAMES)}")
        return value
    text = str(value).strip().lower().removeprefix("torch.")
    text = ALIASES.get(text, text)
    if text not in NAMES:
        raise ConfigError(f"unknown dtype {value!r}: choose one of {', '.join(NAMES)}")
    return NAMES[text]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def supports_bfloat16(device) -> bool:
    return device.kind == "cpu" or (device.compute_capability or (0, 0)) >= (8, 0)


def default_dtype(device) -> torch.dtype:
    if device.kind == "cpu":
        return torch.float32
    return torch.bfloat16 if supports_bfloat16(device) else torch.float16


def choose_dtype(device, requested=None) -> torch.dtype:
    """The dtype for `device` (a hardware.DeviceInfo): `requested` (name or torch.dtype) if it can run there, else the default."""
    if requested is None:
        return default_dtype(device)
    dtype = parse_dtype(requested)
    if dtype == torch.bfloat16 and not supports_bfloat16(device):
        raise ConfigError(
            f"bfloat16 needs a GPU of compute capability 8.0 or newer (Ampere); {device.describe()} has none: "
            "use dtype float16 (a bfloat16 checkpoint is converted) or float32, or leave dtype unset"
        )
    return dtype


def common_dtype(devices, requested=None) -> torch.dtype:
    """One dtype every device of a split supports (float16 when a mixed set includes a pre-Ampere GPU)."""
    chosen = [choose_dtype(d, requested) for d in devices]
    if len(set(chosen)) <= 1:
        return chosen[0] if chosen else torch.float32
    if torch.float16 in chosen:
        return torch.float16
    return torch.float32


def check_finite(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """Raise NonFiniteError when `tensor` holds inf/nan (syncs the device: call it in checks, not every step)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        hint = (
            "float16 holds at most ±65504 and this model's activations exceed it: "
            "run in float32 (config.dtype = 'float32' or LOWGEAR_DTYPE=float32), or on a bfloat16-capable GPU (sm_80+)"
            if tensor.dtype == torch.float16
            else "the weights or inputs may be corrupt; try float32"
        )
        raise NonFiniteError(f"{bad} non-finite values (inf/nan) in {where} ({dtype_name(tensor.dtype)}): {hint}")
    return tensor
