"""model/fuse.py: q|k|v and gate|up fused at load where the formats allow it, and the same logits.

Each format loads twice, fused (the default) and with config.no_fuse, and the two runs must give
the same float32 logits on the CPU path: a fused linear reads the same weights, concatenated along
its output rows, so only BLAS blocking over a wider matrix can differ (1e-6). Sets that must not
fuse (mixed qtypes, EXL2, act-order GPTQ whose layers sorted their inputs differently) stay three
(two) linears and are still right. The fused GPTQ layer also runs through the Triton kernel hook,
in the interpreter on machines without CUDA (conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import all_logits, interpreter_index_shim, load, use_ops

from lowgear.model.fuse import fuse_linear, fuse_weights
from lowgear.model.linear import QuantLinear
from lowgear.formats.gptq import GPTQWeight
from lowgear.bench.synthetic import write_gguf, write_hf
from lowgear.formats import open_weights

FIXTURES = Path(__file__).parent / "fixtures" / "exllamav2"
IDS = [5, 17, 3, 99, 42, 7, 250, 8, 61, 13, 77, 2, 190, 33, 4, 120, 9]


def _both(path, **switches):
    switches.setdefault("cpu_weights", "packed")  # fusing packed weights is the point (unpacked: test_cpu_weights.py)
    fused = load(path, max_seq_len=128, dtype="float32", **switches)
    plain = load(path, max_seq_len=128, dtype="float32", no_fuse=True, **switches)
    return fused, plain


def _fusion(model) -> list[tuple[bool, bool]]:
    """Per layer: (q/k/v fused, gate/up fused)."""
    return [(layer.attn.qkv is not None, layer.mlp.gate_up is not None) for layer in model.layers]


def _assert_same_logits(fused, plain, ids=IDS):
    for prompt in (ids, ids[:1]):
        a, b = all_logits(*fused, prompt), all_logits(*plain, prompt)
        # float32: one matmul over the fused rows may sum K in another order than three (a one-row
        # step goes through BLAS's GEMV, whose blocking depends on N): 2e-6 seen on logits near 10,
        # float32's rounding there; a wrong fusion (rows swapped, a part missing) moves them by >0.01
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _layer_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for layer in model.layers
               for t in list(layer.parameters()) + list(layer.buffers()))


# --------------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_float_hf_model_fuses(tmp_path, arch):
    path = write_hf(tmp_path / arch, arch=arch, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=96, seed=3)
    fused, plain = _both(path)
    assert _fusion(fused[0]) == [(True, True)] * 2 and _fusion(plain[0]) == [(False, False)] * 2
    attn = fused[0].layers[0].attn
    assert attn.q is None and attn.qkv.out_features == 64 + 2 * 32 and attn.qkv.qtype == "F32"
    assert (attn.qkv.bias is not None) == (arch == "qwen2")
    assert fused[0].layers[0].mlp.gate_up.out_features == 2 * 96
    names = set(dict(fused[0].layers[0].named_parameters()))
    assert {"attn.qkv.weight", "mlp.gate_up.weight", "mlp.down.weight", "attn.o.weight"} <= names
    assert _layer_bytes(fused[0]) == _layer_bytes(plain[0])
    _assert_same_logits(fused, plain)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_packed_model_fuses(tmp_path, qtype, arch):
    hidden = 256 if qtype == "Q4_K" else 64  # K-quants need rows of 256
    path = write_gguf(tmp_path / "m.gguf", arch=arch, hidden_size=hidden, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=hidden * 2, qtype=qtype, seed=5)
    fused, plain = _both(path)
    assert _fusion(fused[0]) == [(True, True)] * 2
    qkv = fused[0].layers[1].attn.qkv
    assert qkv.packed and qkv.qtype == qtype and qkv.weight is None
    assert not any(b.is_floating_point() for b in qkv.buffers())  # never a float copy of the weight
    assert (qkv.bias is not None) == (arch == "qwen2")
    assert _layer_bytes(fused[0]) == _layer_bytes(plain[0])
    _assert_same_logits(fused, plain)


def test_gguf_mixed_qtypes_do_not_fuse(tmp_path):
    types = {"blk.0.attn_v.weight": "Q8_0", "blk.1.ffn_up.weight": "F16"}
    path = write_gguf(tmp_path / "m.gguf", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, qtype="Q4_0", tensor_types=types, seed=6)
    fused, plain = _both(path)
    assert _fusion(fused[0]) == [(False, True), (True, False)]
    attn = fused[0].layers[0].attn
    assert (attn.q.qtype, attn.k.qtype, attn.v.qtype) == ("Q4_0", "Q4_0", "Q8_0")
    _assert_same_logits(fused, plain)


def test_gptq_model_fuses(tmp_path):
    from test_gptq import write_gptq_llama

    _, folder = write_gptq_llama(tmp_path, bits=4, group_size=32)
    fused, plain = _both(folder)
    assert _fusion(fused[0]) == [(True, True)] * 2
    qkv = fused[0].layers[0].attn.qkv
    assert qkv.qtype == "GPTQ4g32" and qkv.out_features == 128 and qkv.in_features == 64
    assert _layer_bytes(fused[0]) == _layer_bytes(plain[0])  # no g_idx: the same bytes
    _assert_same_logits(fused, plain)


@pytest.mark.parametrize("name,fuses", [("gptq-4bit-g128", True), ("gptq-4bit-g64-actorder", False)])
def test_exllamav2_gptq_fixtures(name, fuses):
    # the act-order fixture's q, k and v were each sorted by their own g_idx: they cannot share one
    fused, plain = _both(FIXTURES / name)
    assert _fusion(fused[0]) == [(fuses, fuses)] * len(fused[0].layers)
    _assert_same_logits(fused, plain)


@pytest.mark.parametrize("name", ["exl2-2.6bpw", "exl2-4.5bpw"])
def test_exl2_never_fuses(name):
    fused, plain = _both(FIXTURES / name)
    assert _fusion(fused[0]) == [(False, False)] * len(fused[0].layers)
    _assert_same_logits(fused, plain)


# --------------------------------------------------------------------------------- fuse_weights


def test_fuse_packed_concatenates_rows_without_unpacking(tmp_path):
    src = open_weights(write_gguf(tmp_path / "m.gguf", hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                                  qtype="Q4_0", seed=1))
    parts = [src.get(f"layers.0.{n}") for n in ("q", "k", "v")]
    fused = fuse_weights(parts)
    assert fused.qtype == "Q4_0" and fused.shape == (128, 64) and fused.data.dtype == torch.uint8
    want = torch.cat([QuantLinear(p).dequantized() for p in parts])
    torch.testing.assert_close(QuantLinear(fused).dequantized(), want, rtol=0, atol=0)


def test_fuse_refuses_mismatches(tmp_path):
    from test_quant_kernels_gptq import make_gptq

    src = open_weights(write_gguf(tmp_path / "m.gguf", hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                                  qtype="Q4_0", tensor_types={"blk.0.attn_v.weight": "Q8_0"}, seed=1))
    q, k, v = (src.get(f"layers.0.{n}") for n in ("q", "k", "v"))
    assert fuse_weights([q, k, v]) is None  # qtypes differ
    assert fuse_weights([q, k]) is not None
    assert fuse_weights([q, torch.zeros(32, 64)]) is None  # packed and float
    assert fuse_weights([torch.zeros(8, 64), torch.zeros(8, 32)]) is None  # in_features differ
    assert fuse_weights([torch.zeros(8, 64)]) is None
    mixed = fuse_weights([torch.ones(8, 64, dtype=torch.float16), torch.ones(4, 64, dtype=torch.bfloat16)])
    assert mixed.dtype == torch.float32 and mixed.shape == (12, 64)  # widening is exact
    a, _ = make_gptq(4, 64, 128, 32, act_order=True, seed=1)
    b, _ = make_gptq(4, 32, 128, 32, act_order=True, seed=2)
    assert fuse_weights([a, b]) is None  # different g_idx
    b.g_idx = a.g_idx.clone()
    assert fuse_weights([a, b]).shape == (96, 128)
    c, _ = make_gptq(4, 32, 128, 64, seed=3)
    d, _ = make_gptq(8, 32, 128, 32, seed=4)
    e, _ = make_gptq(4, 32, 128, 32, seed=5)
    assert fuse_weights([e, c]) is None and fuse_weights([e, d]) is None  # group size, bits
    assert fuse_weights([e, a]) is None  # one act-order, one not
    assert fuse_linear([q, k], [torch.zeros(64), None]) is None  # bias on some parts only
    w, bias = fuse_linear([q, k], [torch.zeros(64), torch.ones(32)])
    assert bias.shape == (96,) and w.shape == (96, 64)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_fuse_gptq_equals_parts(bits, act_order):
    from test_quant_kernels_gptq import make_gptq

    parts = [make_gptq(bits, n, 128, 32, act_order=act_order, seed=n)[0] for n in (64, 32, 32)]
    for p in parts[1:]:
        p.g_idx = parts[0].g_idx
    fused = fuse_weights(parts)
    assert isinstance(fused, GPTQWeight) and fused.shape == (128, 128)
    want = torch.cat([QuantLinear(p).dequantized(torch.float64) for p in parts])
    torch.testing.assert_close(QuantLinear(fused).dequantized(torch.float64), want, rtol=0, atol=0)


# --------------------------------------------------------------------------------- kernel hook


@pytest.fixture
def interpreter_shim():
    with interpreter_index_shim():
        yield


@pytest.mark.parametrize("act_order", [False, True])
def test_fused_gptq_through_kernel_hook(interpreter_shim, act_order):
    """The GEMV and the prefill dequantizer on a fused layer give the parts' outputs."""
    pytest.importorskip("triton")
    from test_quant_kernels_gptq import make_gptq

    from lowgear.ops import matmul as kernels
    from lowgear.ops.matmul import gptq_gemv as G

    device = "cuda" if torch.cuda.is_available() else "cpu"
    parts = [make_gptq(4, n, 128, 32, act_order=act_order, seed=n)[0] for n in (64, 32, 32)]
    for p in parts[1:]:
        p.g_idx = parts[0].g_idx
    biases = [torch.randn(p.out_features) for p in parts]
    weight, bias = fuse_linear(parts, biases)
    fused = QuantLinear(weight, bias).to(device)
    alone = [QuantLinear(p, b).to(device) for p, b in zip(parts, biases)]
    for m in [fused, *alone]:
        m.kernel = kernels.kernel_for(m)
        assert m.kernel is G.gptq_matmul
    assert fused._gptq_kernel["sorted"] == act_order
    for rows in (1, 3, G.MAX_M + 3):  # GEMV, GEMV, prefill dequantizer
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)).to(device)
        want = torch.cat([m(x) for m in alone], dim=-1)
        torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["gptq", "Q4_0"])
def test_fused_model_through_kernel_hooks(tmp_path, interpreter_shim, fmt):
    """Whole models on the Triton ops (attach_kernels puts every packed linear on its Triton kernel):
    fused and unfused logits agree."""
    pytest.importorskip("triton")
    from lowgear.ops import dispatch

    if fmt == "gptq":
        from test_gptq import write_gptq_llama

        _, path = write_gptq_llama(tmp_path, bits=4, group_size=32)
    else:
        path = write_gguf(tmp_path / "m.gguf", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=128, qtype=fmt, seed=2)
    fused, plain = _both(path)
    assert _fusion(fused[0]) == [(True, True)] * 2
    for model, _ in (fused, plain):
        use_ops(model, dispatch.triton_ops())
        assert all(m.kernel is not None for layer in model.layers for m in layer.modules()
                   if isinstance(m, QuantLinear) and m.packed)
    for prompt in (IDS[:1], IDS[:3]):  # the GEMV path (M <= MAX_M)
        torch.testing.assert_close(all_logits(*fused, prompt), all_logits(*plain, prompt), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(all_logits(*fused, IDS), all_logits(*plain, IDS), rtol=1e-5, atol=1e-5)
