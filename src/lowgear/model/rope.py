"""Rotary position embeddings: the frequencies (with linear, llama3 and LongRoPE scaling) and cos/sin tables.

The rotation itself is an op (ops/rope.py, both layouts: "neox" pairs element i with i + rot/2,
the Hugging Face layout; "interleaved" pairs 2i with 2i+1, llama.cpp's, whose GGUF q/k rows are
permuted at conversion to match). rot is `spec.rotary_dim` (partial rotary, phi3's
partial_rotary_factor: the first rot dims of each head turn, the rest pass) or the whole head.

LongRoPE (Phi-3 "longrope" / "su"): inv_freq[i] = 1 / (factor[i] * theta ** (2i / rot)) with the
short factors, or the long ones for long contexts, and cos / sin both scaled by the attention factor
sqrt(1 + ln(s) / ln(original context)), s = context / original context (transformers' and
llama.cpp's formula). Which factors: the choice is made once per rope table from the longest
sequence the cache can hold, as llama.cpp does from its context size: long factors when that
exceeds original_max_position_embeddings. transformers instead picks per forward call from the
sequence's current length, so it agrees wherever the cache is no longer than the original context,
and wherever a prompt is longer than it; a sequence that grows past it mid-generation keeps the
short-rotated keys in transformers' cache, which a paged cache shared by many sequences cannot mirror.
why: docs/decisions/018-longrope-factors-by-context.md
"""

from __future__ import annotations

import math

import torch

from ..formats.spec import ModelSpec


def uses_long_factors(spec: ModelSpec, longest: int) -> bool:
    """Whether LongRoPE's long factors apply when sequences may reach `longest` tokens (see above)."""
    scaling = spec.rope_scaling or {}
    return scaling.get("type") == "longrope" and min(longest, spec.max_position_embeddings) > int(
        scaling["original_max_position_embeddings"])


def attention_factor(spec: ModelSpec) -> float:
    """The factor cos and sin are scaled by (LongRoPE's), else 1."""
    scaling = spec.rope_scaling or {}
    return float(scaling.get("attention_factor", 1.0)) if scaling.get("type") == "longrope" else 1.0


def inv_frequencies(spec: ModelSpec, long: bool = False, local: bool = False) -> torch.Tensor:
    """[rot / 2] float32 angular frequency per rotated pair, scaling applied (`long`: LongRoPE's long factors).

    `local`: the sliding layers' own base (spec.rope_local_theta, gemma3), which takes no scaling.
    """
    dim = spec.rotary_dim or spec.head_dim
    if local:
        return 1.0 / (spec.rope_local_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = spec.rope_scaling or {}
    kind = scaling.get("type") or scaling.get("rope_type")
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if kind == "longrope":
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (factors * spec.rope_theta ** exponents)
    inv_freq = 1.0 / (spec.rope_theta ** exponents)
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


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, rot/2] cos and sin of each token's angles (times `scale`), in float32."""
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    if scale == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * scale, angles.sin() * scale
