"""ops/matmul/repack.py: GGUF Q4_0 / Q8_0 layers held as GPTQ tensors, against gguf-py's own dequantizer.

The reference is `gguf.quants.dequantize` (llama.cpp's Python package) on the same bytes, so it
shares no code with lowgear. The GPTQ form must give the same weights bit for bit (float64
dequantization of both), the module must keep answering as a Q4_0 / Q8_0 layer (qtype, lookup rows
for a tied embedding, the torch path), and the kernel hook it gets must be the GPTQ one, matching
the float64 matmul at decode and prefill row counts. Kernels run in Triton's interpreter without CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from helpers import interpreter_index_shim

from lowgear.model.linear import QuantLinear
from lowgear.formats.gptq import dequantize_gptq
from lowgear.ops.matmul import repack
from lowgear.ops.matmul.repack import gguf_to_gptq
from lowgear.formats.spec import PackedTensor

pytest.importorskip("triton")

from lowgear.ops import matmul as kernels
from lowgear.ops.matmul import gptq_gemv as G

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QTYPES = ["Q4_0", "Q8_0"]


@pytest.fixture(autouse=True, scope="module")
def _interpreter_numpy_shim():
    with interpreter_index_shim():
        yield


def layer_bytes(qtype: str, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(GGUF bytes [n, row_bytes] from gguf-py's quantizer on random weights, their float64 values)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.005, 0.05, (n, 1))).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    data = quants.quantize(w, GGMLQuantizationType[qtype])
    ref = quants.dequantize(data, GGMLQuantizationType[qtype]).astype(np.float64)
    return data, ref


@pytest.mark.parametrize("qtype", QTYPES)
def test_gptq_form_is_the_same_weights(qtype, monkeypatch):
    monkeypatch.setattr(repack, "BAND", 16)  # 72 columns: four whole bands and a part
    data, ref = layer_bytes(qtype, 72, 96, seed=1)
    w = gguf_to_gptq(qtype, torch.from_numpy(data), 96)
    assert (w.bits, w.group_size, w.sym, w.zero_offset, w.g_idx) == ((4 if qtype == "Q4_0" else 8), 32, True, 0,
                                                                      None)
    torch.testing.assert_close(dequantize_gptq(w, dtype=torch.float64), torch.from_numpy(ref), rtol=0, atol=0)


@pytest.mark.parametrize("qtype", QTYPES)
def test_module_switches_to_the_gptq_kernel_and_keeps_its_answers(qtype):
    n, k = 72, 160
    data, ref = layer_bytes(qtype, n, k, seed=2)
    lin = QuantLinear(PackedTensor(qtype, torch.from_numpy(data), (n, k))).to(DEVICE)
    ids = torch.tensor([3, 0, 71, 3])
    before = lin.lookup(ids).cpu()
    lin.kernel = kernels.kernel_for(lin)
    assert lin.kernel is G.gptq_matmul and lin._gptq is not None and lin.qtype == qtype
    torch.testing.assert_close(lin.lookup(ids).cpu(), before, rtol=0, atol=0)
    torch.testing.assert_close(lin.dequantized(torch.float64).cpu(), torch.from_numpy(ref), rtol=0, atol=0)
    held = sum(t.numel() * t.element_size() for t in (lin.qweight, lin.qzeros, lin.scales, lin.gptq_zeros))
    assert held < (0.65 if qtype == "Q4_0" else 1.2) * n * k  # bytes a weight as held, zeros included
    gen = torch.Generator().manual_seed(3)
    for m in (1, 3, G.MAX_M + 1):
        x = torch.randn(m, k, generator=gen)
        y = lin(x.to(DEVICE)).double().cpu()
        want = x.double() @ torch.from_numpy(ref).T
        assert float((y - want).abs().max() / want.abs().max()) < 1e-5, m


@pytest.mark.parametrize("qtype,n", [("Q4_1", 8), ("Q4_0", 70), ("Q8_0", 33)])
def test_layers_without_a_gptq_form_keep_their_block_kernel(qtype, n):
    """Q4_1 (a per-block minimum), and Q4_0 / Q8_0 with N * bits not whole int32 words."""
    data, ref = layer_bytes(qtype, n, 64, seed=4)
    assert not repack.can_hold(qtype, n, 64)
    lin = QuantLinear(PackedTensor(qtype, torch.from_numpy(data), (n, 64))).to(DEVICE)
    lin.kernel = kernels.kernel_for(lin)
    assert lin._gptq is None and lin.kernel is not None and lin.kernel is not G.gptq_matmul
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    want = x.double() @ torch.from_numpy(ref).T
    assert float((lin(x.to(DEVICE)).double().cpu() - want).abs().max() / want.abs().max()) < 1e-5
