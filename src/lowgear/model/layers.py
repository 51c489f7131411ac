"""The Llama-family blocks, as the paper writes them: RMSNorm, attention with RoPE and GQA, SwiGLU.

Layers hold weights and nothing else; the step's metadata and the layer's KV cache come in as
arguments, and attention goes through whichever backend the ladder chose for the layer's device.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention.metadata import StepMetadata
from ..weights.spec import ModelSpec
from .quant_linear import QuantLinear
from .rope import apply_rope


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, q: QuantLinear, k: QuantLinear, v: QuantLinear, o: QuantLinear):
        super().__init__()
        self.q, self.k, self.v, self.o = q, k, v, o
        self.heads, self.kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.scale = self.head_dim**-0.5
        self.rope_style = spec.rope_style
        self.window = spec.sliding_window

    def forward(self, x, cos, sin, meta: StepMetadata, k_cache, v_cache, backend) -> torch.Tensor:
        t = x.shape[0]
        q = apply_rope(self.q(x).view(t, self.heads, self.head_dim), cos, sin, self.rope_style)
        k = apply_rope(self.k(x).view(t, self.kv_heads, self.head_dim), cos, sin, self.rope_style)
        v = self.v(x).view(t, self.kv_heads, self.head_dim)
        out = backend.forward(q, k, v, k_cache, v_cache, meta, self.scale, self.window)
        return self.o(out.reshape(t, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, gate: QuantLinear, up: QuantLinear, down: QuantLinear):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class DecoderLayer(nn.Module):
    def __init__(self, attn_norm: RMSNorm, attn: Attention, ffn_norm: RMSNorm, mlp: MLP):
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.mlp = attn_norm, attn, ffn_norm, mlp

    def forward(self, h, cos, sin, meta, k_cache, v_cache, backend) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), cos, sin, meta, k_cache, v_cache, backend)
        return h + self.mlp(self.ffn_norm(h))
