"""The norm / RoPE+KV-write / silu-mul ops, both sets (ops/dispatch.py's torch and Triton ops), against
float64 references written from the math.

Without CUDA the Triton ops run in Triton's interpreter (conftest sets TRITON_INTERPRET=1).
"""

import pytest
import torch

from lowgear.ops import dispatch
from lowgear.ops.norm import rms_norm_ref
from lowgear.ops.rope import apply_rope_ref, apply_rope_triton

pytest.importorskip("triton")

OPS = {"torch": dispatch.torch_ops(), "triton": dispatch.triton_ops()}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def close(a, b, dtype):
    torch.testing.assert_close(a.double().cpu(), b.double().cpu(), rtol=TOL[dtype], atol=TOL[dtype])


def rms_norm_64(x, w, eps, residual=None):
    """RMSNorm in float64 from its definition: (x [+ residual]) / sqrt(mean(square) + eps) * w."""
    h = x.double() if residual is None else x.double() + residual.double()
    out = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    return out if residual is None else (out, h)


@pytest.mark.parametrize("impl", sorted(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [64, 96])  # 96: masked tail of the power-of-two block
def test_rms_norm(impl, dtype, hidden):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, hidden, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    out = OPS[impl].rms_norm(x.to(DEVICE), w.to(DEVICE), 1e-5)
    close(out, rms_norm_64(x, w, 1e-5), dtype)
    assert out.dtype == dtype and out.shape == x.shape


@pytest.mark.parametrize("impl", sorted(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_with_residual_updates_residual_in_place(impl, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 128, generator=gen).to(dtype)
    res = torch.randn(2, 3, 128, generator=gen).to(dtype)
    w = torch.randn(128, generator=gen).to(dtype)
    ref_out, ref_h = rms_norm_ref(x, w, 1e-6, res, compute_dtype=torch.float64)
    out64, h64 = rms_norm_64(x, w, 1e-6, res)
    close(ref_h, h64, dtype)  # the reference rounds the sum to the residual's dtype, as the ops do
    close(ref_out, out64, dtype)
    res_dev = res.to(DEVICE)
    out, new_res = OPS[impl].rms_norm(x.to(DEVICE), w.to(DEVICE), 1e-6, residual=res_dev)
    assert new_res is res_dev
    close(new_res, ref_h, dtype)
    close(out, ref_out, dtype)


def _cache(max_pos, half, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(half, dtype=torch.float64) * 2 / (2 * half))
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


@pytest.mark.parametrize("style", ["neox", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_in_place(style, dtype):
    gen = torch.Generator().manual_seed(2)
    t, hq, hk, d = 4, 6, 2, 32  # 6 q heads: masked head block
    q = torch.randn(t, hq, d, generator=gen).to(dtype)
    k = torch.randn(t, hk, d, generator=gen).to(dtype)
    pos = torch.tensor([0, 7, 3, 30])
    cos64, sin64 = _cache(64, d // 2)
    ref_q, ref_k = apply_rope_ref(q.double(), k.double(), pos, cos64, sin64, style, torch.float64)
    qd, kd = q.to(DEVICE), k.to(DEVICE)
    apply_rope_triton(qd, kd, pos.to(DEVICE), cos64.float().to(DEVICE), sin64.float().to(DEVICE), style)
    close(qd, ref_q, dtype)
    close(kd, ref_k, dtype)


def test_rope_on_strided_views_of_fused_qkv_and_partial_rotary():
    gen = torch.Generator().manual_seed(3)
    t, hq, hk, d = 3, 4, 2, 16
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=gen)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    v_before = qkv[:, (hq + hk) * d:].clone()
    pos = torch.tensor([5, 1, 2])
    cos64, sin64 = _cache(8, 4)  # rot_dim 8 < head_dim 16: the tail stays as it was
    ref_q, ref_k = apply_rope_ref(q.double(), k.double(), pos, cos64, sin64, "neox", torch.float64)
    qkv_d = qkv.to(DEVICE)
    qd = qkv_d[:, : hq * d].view(t, hq, d)
    kd = qkv_d[:, hq * d:(hq + hk) * d].view(t, hk, d)
    apply_rope_triton(qd, kd, pos.to(DEVICE), cos64.float().to(DEVICE), sin64.float().to(DEVICE), "neox")
    close(qd, ref_q, torch.float32)
    close(kd, ref_k, torch.float32)
    assert torch.equal(qkv_d[:, (hq + hk) * d:].cpu(), v_before)


def test_rope_ref_against_the_rotation_written_out():
    """apply_rope_ref (the torch op's math and the tests' reference) against each pair rotated by hand."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 16, generator=gen, dtype=torch.float64)
    pos = torch.tensor([0, 4, 9])
    cos, sin = _cache(16, 8)
    neox, interleaved = [(i, i + 8) for i in range(8)], [(2 * i, 2 * i + 1) for i in range(8)]
    for style, pairs in (("neox", neox), ("interleaved", interleaved)):
        ours, _ = apply_rope_ref(x, x[:, :1], pos, cos, sin, style, torch.float64)
        want = x.clone()
        for t, p in enumerate(pos.tolist()):
            for i, (a, b) in enumerate(pairs):
                c, s_ = cos[p, i], sin[p, i]
                want[t, :, a] = x[t, :, a] * c - x[t, :, b] * s_
                want[t, :, b] = x[t, :, b] * c + x[t, :, a] * s_
        torch.testing.assert_close(ours, want)


@pytest.mark.parametrize("impl", sorted(OPS))
# (head_dim, rotated pairs): 4 < head_dim / 2: partial rotary, the tail written unrotated; 6 of 8 pairs
# (Phi-4-mini's 96 of 128 dims) and a head of 24 (Phi-3's 96): ranges that are not powers of two, masked
@pytest.mark.parametrize("d,rot", [(16, 8), (16, 4), (16, 6), (24, 12)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_rope_writes_rotated_k_and_v_into_cache_slots(impl, d, rot, cache_dtype):
    """rope_kv_: q and k rotated in place, and the cache rows at the slots hold rotated k and v (what
    write_kv would store); every other slot is untouched."""
    gen = torch.Generator().manual_seed(5)
    t, hq, hk, pages, page = 5, 6, 3, 4, 4  # GQA 6/3, q heads padded to a block of 8
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=gen)
    split = lambda x: (x[:, : hq * d].view(t, hq, d), x[:, hq * d:(hq + hk) * d].view(t, hk, d),  # noqa: E731
                       x[:, (hq + hk) * d:].view(t, hk, d))
    q, k, v = split(qkv)
    pos = torch.tensor([0, 9, 3, 4, 12])
    slots = torch.tensor([3, 4, 15, 8, 0])  # crosses pages, not in order
    cos64, sin64 = _cache(16, rot)
    ref_q, ref_k = apply_rope_ref(q.double(), k.double(), pos, cos64, sin64, "neox", torch.float64)
    kc = torch.randn(pages, page, hk, d, generator=gen).to(cache_dtype)
    vc = torch.randn(pages, page, hk, d, generator=gen).to(cache_dtype)
    kc_ref, vc_ref = kc.clone().view(-1, hk, d), vc.clone().view(-1, hk, d)
    kc_ref[slots], vc_ref[slots] = ref_k.to(cache_dtype), v.to(cache_dtype)
    qkv_d = qkv.to(DEVICE)
    qd, kd, vd = split(qkv_d)
    kcd, vcd = kc.to(DEVICE), vc.to(DEVICE)
    OPS[impl].rope_kv_(qd, kd, vd, pos.to(DEVICE), cos64.float().to(DEVICE), sin64.float().to(DEVICE), "neox",
                       kcd, vcd, slots.to(DEVICE))
    close(qd, ref_q, torch.float32)
    close(kd, ref_k, torch.float32)
    close(kcd.view(-1, hk, d), kc_ref, cache_dtype)
    close(vcd.view(-1, hk, d), vc_ref, cache_dtype)
    untouched = torch.ones(pages * page, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(kcd.view(-1, hk, d)[untouched.to(DEVICE)].cpu(), kc.view(-1, hk, d)[untouched])


@pytest.mark.parametrize("style", ["neox", "interleaved"])
@pytest.mark.parametrize("fused", [True, False])
def test_torch_rope_kv_both_layouts_fused_or_apart(style, fused):
    """The torch op's in-place float32 rotation (q and k as one view where they are adjacent, else apart), both
    layouts, a partial rotary, against the float64 reference; v reaches the cache unrotated."""
    gen = torch.Generator().manual_seed(6)
    t, hq, hk, d = 3, 4, 2, 16
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=gen)
    if fused:
        q, k, v = (qkv[:, : hq * d].view(t, hq, d), qkv[:, hq * d:(hq + hk) * d].view(t, hk, d),
                   qkv[:, (hq + hk) * d:].view(t, hk, d))
    else:
        q, k, v = (torch.randn(t, hq, d, generator=gen), torch.randn(t, hk, d, generator=gen),
                   torch.randn(t, hk, d, generator=gen))
    pos = torch.tensor([2, 0, 7])
    cos64, sin64 = _cache(8, 6)  # 12 of 16 dims rotated
    ref_q, ref_k = apply_rope_ref(q.double(), k.double(), pos, cos64, sin64, style, torch.float64)
    kc, vc = torch.zeros(2, 4, hk, d), torch.zeros(2, 4, hk, d)
    slots = torch.tensor([5, 0, 3])
    v_want = v.clone()
    OPS["torch"].rope_kv_(q, k, v, pos, cos64.float(), sin64.float(), style, kc, vc, slots)
    close(q, ref_q, torch.float32)
    close(k, ref_k, torch.float32)
    close(kc.view(-1, hk, d)[slots], ref_k, torch.float32)
    assert torch.equal(vc.view(-1, hk, d)[slots], v_want)


@pytest.mark.parametrize("impl", sorted(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inter", [96, 1500])  # masked tail; two column blocks
def test_silu_mul(impl, dtype, inter):
    silu_mul = OPS[impl].silu_mul
    gen = torch.Generator().manual_seed(6)
    gate_up = (3 * torch.randn(3, 2 * inter, generator=gen)).to(dtype)
    g, u = gate_up.double().chunk(2, dim=-1)
    out = silu_mul(gate_up.to(DEVICE))
    assert out.shape == (3, inter) and out.dtype == dtype
    close(out, g * torch.sigmoid(g) * u, dtype)
