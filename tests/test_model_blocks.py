"""One decoder block, with the torch ops and with the Triton ops (ops/dispatch.py), against float64
math written out here: RMSNorm, q/k/v, RoPE from the frequencies, causal GQA attention, SwiGLU.

The block is fed step by step through a paged cache (page size 4): two sequences of odd lengths
(7 and 5), then decode steps that land on the last slot of a page and on a fresh page, then a mixed
step (a 3-token chunk beside a decode). Every row's output, and the cache rows written, must equal
the reference computed over each whole sequence at once. The residual stream comes in split as
h + pending (the previous layer's MLP output not yet added), as the model's step feeds it.
Without CUDA the Triton ops run in the interpreter (conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import interpreter_index_shim
from lowgear.attention.eager import EagerBackend
from lowgear.attention.metadata import build_metadata
from lowgear.formats.spec import ModelSpec
from lowgear.model.layers import MLP, Attention, DecoderLayer, RMSNorm
from lowgear.model.linear import QuantLinear
from lowgear.model.rope import cos_sin, inv_frequencies
from lowgear.ops import dispatch

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton ops need CUDA tensors, or the interpreter
SPEC = ModelSpec(arch="llama", vocab_size=32, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                 num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=64)
PAGE = 4
TABLES = {"a": [0, 1, 2, 5], "b": [3, 6, 4]}  # out of order; a's 7 tokens end on page 1's last-but-one slot
LENS = {"a": 13, "b": 8}
# (sequence, tokens this step) per step: prefill 7 + 5, decodes onto slot 3 of a page and onto a new
# page, then a 3-token chunk beside one decode
STEPS = [[("a", 7), ("b", 5)], [("a", 1), ("b", 1)], [("a", 1), ("b", 1)], [("a", 3), ("b", 1)], [("a", 1)]]


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, i, hd = SPEC.hidden_size, SPEC.intermediate_size, SPEC.head_dim
    shapes = {"q": (SPEC.num_heads * hd, h), "k": (SPEC.num_kv_heads * hd, h), "v": (SPEC.num_kv_heads * hd, h),
              "o": (h, SPEC.num_heads * hd), "gate": (i, h), "up": (i, h), "down": (h, i)}
    w = {n: torch.randn(s, generator=g, dtype=torch.float64) / math.sqrt(s[1]) for n, s in shapes.items()}
    w["attn_norm"] = 1 + 0.2 * torch.randn(h, generator=g, dtype=torch.float64)
    w["ffn_norm"] = 1 + 0.2 * torch.randn(h, generator=g, dtype=torch.float64)
    return w


def _block(w, fused: bool) -> DecoderLayer:
    lin = {n: QuantLinear(w[n].float()) for n in ("q", "k", "v", "o", "gate", "up", "down")}
    qkv = QuantLinear(torch.cat([w[n] for n in "qkv"]).float()) if fused else (lin["q"], lin["k"], lin["v"])
    gate_up = QuantLinear(torch.cat([w["gate"], w["up"]]).float()) if fused else (lin["gate"], lin["up"])
    eps = SPEC.rms_norm_eps
    return DecoderLayer(RMSNorm(w["attn_norm"].float(), eps), Attention(SPEC, qkv, lin["o"]),
                        RMSNorm(w["ffn_norm"].float(), eps), MLP(gate_up, lin["down"])).to(DEVICE)


def _rms(x, weight):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + SPEC.rms_norm_eps) * weight


def _rope(x, positions):
    """x [T, heads, D] rotated by angle position * theta^(-2i/D) on the pairs (i, i + D/2)."""
    half = SPEC.head_dim // 2
    freq = SPEC.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / SPEC.head_dim)
    ang = positions.double()[:, None, None] * freq
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()), dim=-1)


def reference(w, x):
    """Float64 block over one whole sequence x [L, hidden]: (output [L, hidden], rotated k, v [L, kv_heads, D])."""
    n, hd, group = x.shape[0], SPEC.head_dim, SPEC.num_heads // SPEC.num_kv_heads
    pos = torch.arange(n)
    a = _rms(x, w["attn_norm"])
    q = _rope((a @ w["q"].T).view(n, SPEC.num_heads, hd), pos)
    k = _rope((a @ w["k"].T).view(n, SPEC.num_kv_heads, hd), pos)
    v = (a @ w["v"].T).view(n, SPEC.num_kv_heads, hd)
    out = torch.empty(n, SPEC.num_heads, hd, dtype=torch.float64)
    for head in range(SPEC.num_heads):
        kv = head // group
        scores = q[:, head] @ k[:, kv].T / math.sqrt(hd)
        scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        out[:, head] = scores.softmax(-1) @ v[:, kv]
    h = x + out.reshape(n, -1) @ w["o"].T
    m = _rms(h, w["ffn_norm"])
    gate = m @ w["gate"].T
    return h + (gate * torch.sigmoid(gate) * (m @ w["up"].T)) @ w["down"].T, k, v


@pytest.fixture(autouse=True)
def shim():
    with interpreter_index_shim():
        yield


def _run(block, ops, backend, xs, splits):
    """Feed the sequences step by step; returns each sequence's output rows and the caches."""
    kv_shape = (7, PAGE, SPEC.num_kv_heads, SPEC.head_dim)
    k_cache, v_cache = torch.zeros(kv_shape, device=DEVICE), torch.zeros(kv_shape, device=DEVICE)
    table = cos_sin(torch.arange(SPEC.max_position_embeddings, device=DEVICE), inv_frequencies(SPEC).to(DEVICE))
    done = {"a": 0, "b": 0}
    outs = {"a": [], "b": []}
    for step in STEPS:
        q_lens = [t for _, t in step]
        kv_lens = [done[s] + t for s, t in step]
        meta = build_metadata(q_lens, kv_lens, [TABLES[s] for s, _ in step], PAGE, device=DEVICE, logits="all")
        rows = [(s, slice(done[s], done[s] + t)) for s, t in step]
        h = torch.cat([(xs[s][r] - splits[s][r]).float() for s, r in rows]).to(DEVICE)
        pending = torch.cat([splits[s][r].float() for s, r in rows]).to(DEVICE)
        h, pending = block.forward(h, pending, table, meta, k_cache, v_cache, backend, ops)
        out = h + pending
        start = 0
        for s, t in step:
            outs[s].append(out[start:start + t].cpu())
            start += t
            done[s] += t
    return {s: torch.cat(o) for s, o in outs.items()}, k_cache.cpu(), v_cache.cpu()


def _triton_backend():
    from lowgear.attention.triton import TritonBackend

    return TritonBackend()


CASES = {
    "torch ops": (dispatch.torch_ops, EagerBackend),
    "triton ops": (dispatch.triton_ops, EagerBackend),
    "triton ops + triton attention": (dispatch.triton_ops, _triton_backend),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_block_against_float64(case, fused):
    make_ops, make_backend = CASES[case]
    w = _weights(0)
    g = torch.Generator().manual_seed(1)
    xs = {s: torch.randn(n, SPEC.hidden_size, generator=g, dtype=torch.float64) for s, n in LENS.items()}
    splits = {s: torch.randn(n, SPEC.hidden_size, generator=g, dtype=torch.float64) for s, n in LENS.items()}
    outs, k_cache, v_cache = _run(_block(w, fused), make_ops(), make_backend(), xs, splits)
    for s in LENS:
        want, k, v = reference(w, xs[s])
        torch.testing.assert_close(outs[s].double(), want, rtol=1e-4, atol=1e-4)
        slots = torch.tensor([TABLES[s][p // PAGE] * PAGE + p % PAGE for p in range(LENS[s])])
        flat = (-1, SPEC.num_kv_heads, SPEC.head_dim)
        torch.testing.assert_close(k_cache.view(flat)[slots].double(), k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v_cache.view(flat)[slots].double(), v, rtol=1e-5, atol=1e-5)


def test_first_layer_without_pending():
    """pending=None (the first layer): the input is h alone, for both op sets."""
    w = _weights(2)
    x = torch.randn(5, SPEC.hidden_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want, _, _ = reference(w, x)
    table = cos_sin(torch.arange(16, device=DEVICE), inv_frequencies(SPEC).to(DEVICE))
    for make_ops in (dispatch.torch_ops, dispatch.triton_ops):
        kc = torch.zeros(2, PAGE, SPEC.num_kv_heads, SPEC.head_dim, device=DEVICE)
        vc = torch.zeros_like(kc)
        meta = build_metadata([5], [5], [[1, 0]], PAGE, device=DEVICE, logits="all")
        h, pending = _block(w, True).forward(x.float().to(DEVICE), None, table, meta, kc, vc, EagerBackend(),
                                             make_ops())
        torch.testing.assert_close((h + pending).double().cpu(), want, rtol=1e-4, atol=1e-4)
