"""Kernels, in one package: attention (paged decode / prefill), matmul over packed and float weights,
RMSNorm, RoPE with the KV write, SiLU-and-multiply, and the PDL launch rule they share; `dispatch`
chooses, once per device, between these Triton kernels and their torch forms (the ops a block calls).

Each kernel module imports Triton at its top, so nothing here is imported at `import lowgear` time."""

from ..platform import env as _env

if _env.get("LOWGEAR_EMULATE_SM"):  # before any kernel here compiles (ops/emulate.py)
    from .emulate import install_from_env

    install_from_env()
