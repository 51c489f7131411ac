"""Rotary position embeddings: the frequencies (with linear and llama3 scaling) and cos/sin tables.

The rotation itself is an op (ops/rope.py, both layouts: "neox" pairs element i with i + head_dim/2,
the Hugging Face layout; "interleaved" pairs 2i with 2i+1, llama.cpp's, whose GGUF q/k rows are
permuted at conversion to match).
"""

from __future__ import annotations

import math

import torch

from ..formats.spec import ModelSpec


def inv_frequencies(spec: ModelSpec, local: bool = False) -> torch.Tensor:
    """[head_dim / 2] float32 angular frequency per rotated pair, scaling applied.

    `local`: the sliding layers' own base (spec.rope_local_theta, gemma3), which takes no scaling.
    """
    dim = spec.head_dim
    theta = spec.rope_local_theta if local else spec.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if local:
        return inv_freq
    scaling = spec.rope_scaling or {}
    kind = scaling.get("type") or scaling.get("rope_type")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    rope_freqs = spec.extra.get("rope_freqs") if spec.extra else None
    if rope_freqs is not None:  # GGUF carries llama3 scaling as per-pair divisors
        inv_freq = inv_freq / torch.as_tensor(rope_freqs, dtype=torch.float32)
    return inv_freq


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, head_dim/2] cos and sin of each token's angles, in float32."""
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()
