"""Kernels, in one package: attention (paged decode / prefill), matmul over packed and float weights,
RMSNorm, RoPE with the KV write, SiLU-and-multiply, and the PDL launch rule they share; `dispatch`
chooses, once per device, between these Triton kernels and their torch forms (the ops a block calls).

Each kernel module imports Triton at its top, so nothing here is imported at `import lowgear` time."""
