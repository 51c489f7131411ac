"""The Llama-family blocks, as the paper writes them: RMSNorm, attention with RoPE and GQA, SwiGLU.

Layers hold weights and nothing else; the step's metadata and the layer's KV cache come in as
arguments, and attention goes through whichever backend the ladder chose for the layer's device.

On CUDA the same math runs through the fused Triton kernels (`forward_fused`): each residual add is
folded into the RMSNorm that follows it, and q/k are rotated in place by one kernel reading a
per-device cos/sin table at `meta.positions`. The CPU path is the plain torch code below.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention.metadata import StepMetadata
from ..weights.spec import ModelSpec
from .kernels_norm import rms_norm
from .kernels_rope import apply_rope_
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

    def forward_fused(self, x, rope_table, meta: StepMetadata, k_cache, v_cache, backend) -> torch.Tensor:
        """CUDA path: rope_table is (cos, sin) [max_positions, head_dim/2] float32, indexed by meta.positions."""
        t = x.shape[0]
        q = self.q(x).view(t, self.heads, self.head_dim)
        k = self.k(x).view(t, self.kv_heads, self.head_dim)
        apply_rope_(q, k, meta.positions, rope_table[0], rope_table[1], self.rope_style)
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

    def forward_fused(self, h, pending, rope_table, meta, k_cache, v_cache, backend):
        """CUDA path: returns (residual stream, this layer's MLP output not yet added to it).

        `pending` is the previous layer's MLP output (None for the first layer): its add into h is
        fused with this layer's attention norm, as the attention output's add is with the MLP norm.
        h is updated in place, so it must be a tensor the caller owns.
        """
        if pending is None:
            x = rms_norm(h, self.attn_norm.weight, self.attn_norm.eps)
        else:
            x, h = rms_norm(pending, self.attn_norm.weight, self.attn_norm.eps, residual=h)
        a = self.attn.forward_fused(x, rope_table, meta, k_cache, v_cache, backend)
        x, h = rms_norm(a, self.ffn_norm.weight, self.ffn_norm.eps, residual=h)
        return h, self.mlp(x)
