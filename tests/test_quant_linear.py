"""model/linear.py: packed and float linears against a float64 reference."""

import numpy as np
import pytest
import torch

from lowgear.errors import ModelFormatError
from lowgear.model.linear import QuantLinear
from lowgear.formats import QUANT_FORMATS, dequantize
from lowgear.bench.synthetic import random_blocks
from lowgear.formats.spec import PackedTensor


def packed(qtype: str, rows: int, cols: int, seed: int = 0) -> PackedTensor:
    data = random_blocks(np.random.default_rng(seed), qtype, rows, cols, std=0.05)
    return PackedTensor(qtype, torch.from_numpy(data), (rows, cols))


@pytest.mark.parametrize("qtype", sorted(QUANT_FORMATS))
@pytest.mark.parametrize("batch", [1, 3, 7])
def test_packed_matches_float64_reference(qtype, batch):
    cols = 2 * QUANT_FORMATS[qtype].block_size
    w = packed(qtype, 37, cols)
    bias = torch.randn(37)
    lin = QuantLinear(w, bias)
    x = torch.randn(batch, 2, cols)
    ref = x.double() @ dequantize(w, torch.float64).T + bias.double()
    y = lin(x)
    assert y.shape == (batch, 2, 37) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert lin.qtype == qtype and lin.in_features == cols and lin.out_features == 37
    assert lin.nbytes == w.nbytes


@pytest.mark.parametrize("chunk_rows", [1, 5, 36, 37, 38, 1000])
def test_banding_boundaries(chunk_rows):
    w = packed("Q4_K", 37, 256, seed=2)
    lin = QuantLinear(w, chunk_elements=chunk_rows * 256)
    assert lin._band_rows() == min(chunk_rows, 37)
    x = torch.randn(5, 256)
    torch.testing.assert_close(lin(x).double(), x.double() @ dequantize(w, torch.float64).T, rtol=1e-5, atol=1e-5)


def test_half_activations_and_dtype_moves():
    w = packed("Q8_0", 16, 64)
    lin = QuantLinear(w, torch.randn(16)).to(torch.float16)
    assert lin.qweight.dtype == torch.uint8 and lin.bias.dtype == torch.float16
    x = torch.randn(3, 64)
    y = lin(x.half())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), x @ dequantize(w).T + lin.bias.float(), rtol=2e-2, atol=2e-2)
    assert "qweight" in lin.state_dict()


def test_float_weight():
    w = torch.randn(10, 12)
    lin = QuantLinear(w)
    assert lin.qtype == "F32" and lin.nbytes == 480
    x = torch.randn(4, 12)
    torch.testing.assert_close(lin(x), x @ w.T)
    lin = lin.to(torch.bfloat16)
    assert lin.qtype == "BF16" and lin.weight.dtype == torch.bfloat16
    assert lin(x).dtype == torch.float32  # activations keep their dtype
    torch.testing.assert_close(lin.lookup(torch.tensor([2, 0])), w[[2, 0]].bfloat16())


def test_lookup_packed_rows():
    w = packed("Q6_K", 20, 256)
    lin = QuantLinear(w)
    ids = torch.tensor([[3, 19], [0, 3]])
    full = dequantize(w)
    torch.testing.assert_close(lin.lookup(ids), full[ids], rtol=0, atol=0)
    assert lin.lookup(ids, torch.float16).dtype == torch.float16


def test_kernel_hook():
    w = packed("Q4_0", 8, 32)
    lin = QuantLinear(w, torch.ones(8))
    calls = []

    def kernel(x, module):
        calls.append((module.qtype, module.out_features, module.in_features))
        return x.new_zeros(*x.shape[:-1], module.out_features)

    lin.kernel = kernel
    y = lin(torch.randn(2, 32))
    assert calls == [("Q4_0", 8, 32)]
    torch.testing.assert_close(y, torch.ones(2, 8))  # the bias is added after the kernel


def test_bad_shapes():
    w = packed("Q8_0", 4, 64)
    with pytest.raises(ModelFormatError, match="uint8 data"):
        QuantLinear(PackedTensor("Q8_0", w.data[:, :34], (4, 64)))
    with pytest.raises(ModelFormatError, match="bias"):
        QuantLinear(w, torch.zeros(5))


@pytest.mark.gpu
def test_moves_to_cuda():
    w = packed("Q4_K", 33, 256)
    lin = QuantLinear(w).to("cuda", torch.float16)
    assert lin.qweight.is_cuda and lin.qweight.dtype == torch.uint8
    x = torch.randn(3, 256)
    y = lin(x.cuda().half()).float().cpu()
    torch.testing.assert_close(y, x @ dequantize(w).T, rtol=2e-2, atol=2e-2)
