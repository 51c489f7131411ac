"""Every environment variable lowgear reads, read here and nowhere else.

`doctor` prints `ENV_VARS` with the values in force, so a user can see what changed a decision.
"""

from __future__ import annotations

import os

ENV_VARS: dict[str, str] = {
    "LOWGEAR_NO_FLASH_ATTN": "1 turns the flash_attn rung off (as Config.no_flash_attn)",
    "LOWGEAR_NO_XFORMERS": "1 turns the xformers rung off",
    "LOWGEAR_NO_SDPA": "1 turns the sdpa rung off",
    "LOWGEAR_NO_TRITON": "1 turns the triton rung off",
    "LOWGEAR_ATTN_BACKEND": "force one rung: flash_attn | xformers | sdpa | triton | eager",
    "LOWGEAR_NO_PDL": "1 launches decode kernels the plain way on sm_90+ (no programmatic dependent launch)",
    "LOWGEAR_PDL_RELEASE": "auto | loop | wait | start: where sm_90+ decode kernels let the next kernel in (pdl.py)",
    "LOWGEAR_NO_QMMA": "1 keeps 4/8-bit batched decode off the mma.sync CUDA C kernel (Triton kernels serve it)",
    "LOWGEAR_NO_CUDA_GRAPHS": "1 runs decode steps eagerly instead of replaying captured CUDA graphs",
    "LOWGEAR_DEVICES": "devices to use: indexes, UUIDs (or unique prefixes), PCI bus ids, or 'cpu'",
    "LOWGEAR_DTYPE": "float16 | bfloat16 | float32 (default: chosen per device)",
    "LOWGEAR_CPU_WEIGHTS": "auto | unpacked | packed: packed weights on a CPU unpacked once at load or kept packed",
    "LOWGEAR_EMULATE_SM": "70 | 75: run a newer GPU as an sm_70 / sm_75 one (routes, ladder, Triton code for that target)",
    "LOWGEAR_SIMULATE": "simulated device profiles for tests and planning, e.g. 't4' or 't4,a100' or 'cpu'",
    "CUDA_VISIBLE_DEVICES": "which GPUs CUDA shows (read, never set)",
    "CUDA_DEVICE_ORDER": "FASTEST_FIRST (CUDA's default) or PCI_BUS_ID: how CUDA numbers GPUs",
    "TRITON_INTERPRET": "1 runs Triton kernels in the interpreter (CPU)",
}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def get(name: str) -> str | None:
    """The value of one documented variable (None when unset or empty)."""
    assert name in ENV_VARS, f"undocumented environment variable {name}"
    value = os.environ.get(name, "").strip()
    return value or None


def get_raw(name: str) -> str | None:
    """The value exactly as set, even when empty (None only when unset): CUDA_VISIBLE_DEVICES="" hides every GPU."""
    assert name in ENV_VARS, f"undocumented environment variable {name}"
    return os.environ.get(name)


def flag(name: str) -> bool:
    assert name in ENV_VARS, f"undocumented environment variable {name}"
    return _flag(name)


def snapshot() -> dict[str, str | None]:
    """Every documented variable and its value now (for doctor)."""
    return {name: (os.environ.get(name) or None) for name in ENV_VARS}
