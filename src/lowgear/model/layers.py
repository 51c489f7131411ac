"""The Llama-family blocks, as the paper writes them: RMSNorm, attention with RoPE and GQA, SwiGLU.

Gemma's block is the same with four differences, each a field here: GeGLU for SwiGLU (MLP.act),
RMSNorm of the attention and the MLP outputs before their residual adds (DecoderLayer's
post_attn_norm / post_ffn_norm), a per-layer sliding window, softmax scale and score soft-cap
(Attention.window / scale / softcap), and embeddings scaled by sqrt(hidden) (model.py).

Layers hold weights and nothing else; the step's metadata, the layer's KV cache, the attention
backend the ladder chose and the device's `Ops` (ops/dispatch.py: torch or Triton, one contract)
come in as arguments, so the CPU step and the CUDA step are this one code. Each residual add is
folded into the RMSNorm that follows it (`ops.rms_norm(x, w, eps, residual=h)`), and q/k are
rotated in place by the op that also writes k/v to the cache, reading a per-device cos/sin table at
`meta.positions`; the backend then only attends.

Where the weights allow it (model/fuse.py), q/k/v are one linear and gate/up another: one launch
over the concatenated output rows instead of three (two), split back into views of its output.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention.metadata import StepMetadata
from ..errors import ModelFormatError
from ..formats.spec import ModelSpec
from ..ops.kv_write import restore_output, rotate_query
from .linear import QuantLinear


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, ops, residual: torch.Tensor | None = None):
        """Normed x; with `residual`, (normed x + residual, that sum written into residual)."""
        return ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    """`qkv` is one fused linear whose output rows are q|k|v (model/fuse.py), or the three linears.

    `q_norm` / `k_norm` (qwen3): an RMSNorm over head_dim applied to each q / k head before RoPE.
    """

    def __init__(self, spec: ModelSpec, qkv: QuantLinear | tuple[QuantLinear, QuantLinear, QuantLinear],
                 o: QuantLinear, q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None, layer: int = 0):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.sizes = (self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim)
        if isinstance(qkv, QuantLinear):
            if qkv.out_features != sum(self.sizes):
                raise ModelFormatError(f"fused q/k/v has {qkv.out_features} outputs, the heads need {sum(self.sizes)}: "
                                       "the weight file does not match its config")
            self.qkv, self.q, self.k, self.v = qkv, None, None, None
        else:
            self.qkv = None
            self.q, self.k, self.v = qkv
        self.o = o
        self.q_norm, self.k_norm = q_norm, k_norm
        self.scale = spec.attn_scale or self.head_dim**-0.5
        self.rope_style = spec.rope_style
        self.window = spec.window_of(layer)
        self.softcap = spec.attn_softcap

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> q [T, heads, head_dim], k and v [T, kv_heads, head_dim].

        Fused, they are views of one [T, q+k+v] output: unit stride along head_dim, token stride
        q+k+v, which the rope kernel, the cache write and every attention backend take as they are.
        """
        t = x.shape[0]
        if self.qkv is not None:
            q, k, v = self.qkv(x).split(self.sizes, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        return (q.view(t, self.heads, self.head_dim), k.view(t, self.kv_heads, self.head_dim),
                v.view(t, self.kv_heads, self.head_dim))

    def forward(self, x, rope_table, meta: StepMetadata, k_cache, v_cache, backend, ops) -> torch.Tensor:
        """rope_table is (cos, sin) [max_positions, head_dim/2] float32, indexed by meta.positions."""
        t = x.shape[0]
        q, k, v = self.project(x)
        if self.q_norm is not None:  # per head: rows of [T*heads, head_dim]; new tensors, the views stay untouched
            q = self.q_norm.forward(q.reshape(t * self.heads, self.head_dim), ops).view(t, self.heads, self.head_dim)
            k = self.k_norm.forward(k.reshape(t * self.kv_heads, self.head_dim), ops).view(t, self.kv_heads, self.head_dim)
        # RoPE and the cache write in one op; then the backend only attends
        ops.rope_kv_(q, k, v, meta.positions, rope_table[0], rope_table[1], self.rope_style, k_cache, v_cache,
                     meta.slot_mapping)
        # a quantized cache may store K/V rotated and shifted (ops/kv_write.py): q goes into its frame, the output out of it
        out = backend.attend(rotate_query(q, k_cache), k_cache, v_cache, meta, self.scale, self.window, self.softcap)
        out = restore_output(out, v_cache)
        return self.o(out.reshape(t, self.heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU, or GeGLU (tanh GELU) with gelu=True; `gate_up` is one fused linear whose output rows are
    gate|up, or the two linears."""

    def __init__(self, gate_up: QuantLinear | tuple[QuantLinear, QuantLinear], down: QuantLinear, gelu: bool = False):
        super().__init__()
        if isinstance(gate_up, QuantLinear):
            if gate_up.out_features % 2:
                raise ModelFormatError(f"fused gate/up has an odd number of outputs ({gate_up.out_features}): "
                                       "the weight file does not match its config")
            self.gate_up, self.gate, self.up = gate_up, None, None
        else:
            self.gate_up = None
            self.gate, self.up = gate_up
        self.down = down
        self.gelu = gelu

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        if self.gate_up is not None:  # act(gate) * up in one op over the fused output
            return self.down((ops.gelu_mul if self.gelu else ops.silu_mul)(self.gate_up(x)))
        gate, up = self.gate(x), self.up(x)  # EXL2 layers (never fused): torch on every device
        act = nn.functional.gelu(gate, approximate="tanh") if self.gelu else nn.functional.silu(gate)
        return self.down(act * up)


class DecoderLayer(nn.Module):
    """`post_attn_norm` / `post_ffn_norm` (Gemma): RMSNorm of the attention / MLP output before it is added."""

    def __init__(self, attn_norm: RMSNorm, attn: Attention, ffn_norm: RMSNorm, mlp: MLP,
                 post_attn_norm: RMSNorm | None = None, post_ffn_norm: RMSNorm | None = None):
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.mlp = attn_norm, attn, ffn_norm, mlp
        self.post_attn_norm, self.post_ffn_norm = post_attn_norm, post_ffn_norm

    def forward(self, h, pending, rope_table, meta, k_cache, v_cache, backend, ops):
        """Returns (residual stream, this layer's MLP output not yet added to it).

        `pending` is the previous layer's MLP output (None for the first layer): its add into h is
        fused with this layer's attention norm, as the attention output's add is with the MLP norm.
        h is updated in place, so it must be a tensor the caller owns.
        """
        # .forward, not __call__: no module-hook overhead per block on the eager step
        if pending is None:
            x = self.attn_norm.forward(h, ops)
        else:
            x, h = self.attn_norm.forward(pending, ops, residual=h)
        a = self.attn.forward(x, rope_table, meta, k_cache, v_cache, backend, ops)
        if self.post_attn_norm is not None:
            a = self.post_attn_norm.forward(a, ops)
        x, h = self.ffn_norm.forward(a, ops, residual=h)
        m = self.mlp.forward(x, ops)
        return h, (m if self.post_ffn_norm is None else self.post_ffn_norm.forward(m, ops))
