"""Rotary position embeddings: frequencies (with linear and llama3 scaling) and their application.

Two layouts rotate the same pairs of numbers under different names: "neox" rotates element i with
element i + head_dim/2 (the Hugging Face layout), "interleaved" rotates elements 2i and 2i+1
(llama.cpp's layout, whose GGUF q/k rows are permuted at conversion to match).
"""

from __future__ import annotations

import math

import torch

from ..formats.spec import ModelSpec


def inv_frequencies(spec: ModelSpec) -> torch.Tensor:
    """[head_dim / 2] float32 angular frequency per rotated pair, scaling applied."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by cos/sin [T, head_dim/2]."""
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    xf = x.float()
    if style == "neox":
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return out.to(x.dtype)
