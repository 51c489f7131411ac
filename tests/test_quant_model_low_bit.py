"""A whole model in Q2_K, Q3_K, IQ4_NL and IQ4_XS (linears, embedding and head packed) gives the
logits of a float64 llama written out here on the weights gguf-py dequantizes from the same file.

The packed model runs float32 on the CPU (QuantLinear's torch path, the packed embedding lookup);
the reference is RMSNorm, q/k/v, llama.cpp's interleaved RoPE (pairs 2i, 2i+1: a GGUF's q/k rows are
permuted for it), causal GQA attention and SwiGLU in float64. float32 rounding over one layer and a
256-wide head stays far below 1e-4 of the logits' scale; a wrong scale bit or table entry moves them
by whole percents (checked: Q2_K's min added instead of subtracted, Q3_K's hmask bit not inverted).
A sign flip of every scale is invisible here (the llama is odd-symmetric in its weights: -embed and
-W give the same logits); tests/test_quant_dequant.py's bit-for-bit check catches that one.
"""

from __future__ import annotations

import math

import pytest
import torch

gguf = pytest.importorskip("gguf")

from helpers import all_logits, interpreter_index_shim, load, use_ops  # noqa: E402
from lowgear.bench.synthetic import write_gguf  # noqa: E402
from test_weights_gguf import reference_tensors  # noqa: E402

SHAPE = dict(arch="llama", hidden_size=256, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=256)
IDS = [5, 17, 200, 3, 99, 42, 7]


def _rms(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope_interleaved(x, theta):
    """x [T, heads, D]: pair (2i, 2i+1) rotated by position * theta^(-2i/D)."""
    d = x.shape[-1]
    freq = theta ** (-torch.arange(d // 2, dtype=torch.float64) * 2 / d)
    ang = torch.arange(x.shape[0], dtype=torch.float64)[:, None, None] * freq
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * ang.cos() - b * ang.sin()
    out[..., 1::2] = b * ang.cos() + a * ang.sin()
    return out


def reference_logits(w, spec, ids):
    n, hd = len(ids), spec.head_dim
    group = spec.num_heads // spec.num_kv_heads
    eps, theta = spec.rms_norm_eps, spec.rope_theta
    x = w["embed"][torch.tensor(ids)]
    causal = torch.arange(n)[None, :] > torch.arange(n)[:, None]
    for i in range(spec.num_layers):
        L = {k.split(".", 2)[2]: v for k, v in w.items() if k.startswith(f"layers.{i}.")}
        a = _rms(x, L["attn_norm"], eps)
        q = _rope_interleaved((a @ L["q"].T).view(n, spec.num_heads, hd), theta)
        k = _rope_interleaved((a @ L["k"].T).view(n, spec.num_kv_heads, hd), theta)
        v = (a @ L["v"].T).view(n, spec.num_kv_heads, hd)
        out = torch.empty(n, spec.num_heads, hd, dtype=torch.float64)
        for head in range(spec.num_heads):
            scores = (q[:, head] @ k[:, head // group].T / math.sqrt(hd)).masked_fill(causal, float("-inf"))
            out[:, head] = scores.softmax(-1) @ v[:, head // group]
        x = x + out.reshape(n, -1) @ L["o"].T
        m = _rms(x, L["ffn_norm"], eps)
        gate = m @ L["gate"].T
        x = x + (gate * torch.sigmoid(gate) * (m @ L["up"].T)) @ L["down"].T
    return _rms(x, w["norm"], eps) @ w["lm_head"].T


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"])
def test_packed_model_matches_float64_reference(tmp_path, qtype):
    path = write_gguf(tmp_path / f"m-{qtype}.gguf", qtype=qtype, seed=3, std=0.05, **SHAPE)
    model, cache = load(path, max_seq_len=64, page_size=16, attn_backend="eager", cpu_weights="packed")
    assert model.embed.qtype == qtype and model.lm_head.qtype == qtype
    got = all_logits(model, cache, IDS).double()
    ref = reference_logits(reference_tensors(path), model.spec, IDS)
    assert got.shape == ref.shape
    scale = ref.abs().max()
    assert scale > 0.1
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * float(scale))


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"])
def test_packed_model_on_triton_gemvs(tmp_path, qtype):
    """The same model with every packed linear on its Triton GEMV (interpreted on the CPU): decode-sized
    steps (M <= MAX_M) and a prefill (bands dequantized by torch) give the float64 reference's logits."""
    pytest.importorskip("triton")
    from lowgear.model.linear import QuantLinear
    from lowgear.ops import dispatch
    from lowgear.ops.matmul import _gguf_kernel

    path = write_gguf(tmp_path / f"m-{qtype}.gguf", qtype=qtype, seed=4, std=0.05, **SHAPE)
    model, cache = load(path, max_seq_len=64, page_size=16, attn_backend="eager", cpu_weights="packed")
    with interpreter_index_shim():
        use_ops(model, dispatch.triton_ops())
        linears = [m for layer in model.layers for m in layer.modules() if isinstance(m, QuantLinear)]
        assert linears and all(m.kernel is _gguf_kernel for m in linears)
        w = reference_tensors(path)
        for prompt in (IDS[:1], IDS[:3], IDS):
            got = all_logits(model, cache, prompt).double()
            ref = reference_logits(w, model.spec, prompt)
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
