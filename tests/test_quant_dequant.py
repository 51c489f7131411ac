"""formats/dequant.py against gguf-py's numpy dequantizer, on random well-formed blocks."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lowgear.errors import ModelFormatError, UnsupportedError  # noqa: E402
from lowgear.formats import QUANT_FORMATS, dequantize, dequantize_index, dequantize_rows, get_format  # noqa: E402
from lowgear.bench.synthetic import random_blocks  # noqa: E402
from lowgear.formats.spec import PackedTensor  # noqa: E402

# f16 fields of each block, by byte offset
F16_FIELDS = {
    "Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
    "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "Q2_K": (80, 82), "Q3_K": (108,), "IQ4_NL": (0,), "IQ4_XS": (0,),
}


def random_packed(qtype: str, rows: int, blocks: int, seed: int = 0) -> np.ndarray:
    """Uniformly random bytes, with every f16 field replaced by a finite value in [-2, 2]."""
    fmt = QUANT_FORMATS[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, blocks, fmt.block_bytes), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        data[..., off : off + 2] = rng.uniform(-2, 2, (rows, blocks)).astype(np.float16).view(np.uint8).reshape(rows, blocks, 2)
    return data.reshape(rows, -1)


def reference(qtype: str, data: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])


@pytest.mark.parametrize("qtype", sorted(QUANT_FORMATS))
def test_matches_gguf_py_bit_exact(qtype):
    data = random_packed(qtype, rows=7, blocks=3)
    got = dequantize((qtype, torch.from_numpy(data)))
    ref = reference(qtype, data)
    assert got.shape == ref.shape == (7, 3 * QUANT_FORMATS[qtype].block_size)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), ref)


@pytest.mark.parametrize("qtype", sorted(QUANT_FORMATS))
def test_rows_index_and_dtype(qtype):
    data = random_packed(qtype, rows=9, blocks=2, seed=1)
    packed = PackedTensor(qtype, torch.from_numpy(data), (9, 2 * QUANT_FORMATS[qtype].block_size))
    full = dequantize(packed)
    torch.testing.assert_close(dequantize_rows(packed, 2, 7), full[2:7], rtol=0, atol=0)
    ids = torch.tensor([[8, 0, 3], [3, 3, 1]])
    torch.testing.assert_close(dequantize_index(packed, ids), full[ids], rtol=0, atol=0)
    torch.testing.assert_close(dequantize(packed, torch.float16), full.half(), rtol=0, atol=0)
    assert dequantize(packed, torch.bfloat16).dtype == torch.bfloat16


def test_non_contiguous_rows_slice_of_mmap_like_buffer():
    # a row slice that starts at an odd byte offset of a larger buffer still unpacks correctly
    data = random_packed("Q6_K", rows=4, blocks=2)
    big = np.zeros((4, data.shape[1] + 1), dtype=np.uint8)
    big[:, 1:] = data
    view = torch.from_numpy(big)[:, 1:]
    np.testing.assert_array_equal(dequantize(("Q6_K", view)).numpy(), reference("Q6_K", data))


@pytest.mark.parametrize("qtype", sorted(QUANT_FORMATS))
def test_random_blocks_are_well_formed(qtype):
    data = random_blocks(np.random.default_rng(0), qtype, 16, 512, std=0.02)
    w = dequantize((qtype, torch.from_numpy(data)))
    assert torch.isfinite(w).all()
    assert 0.005 < float(w.std()) < 0.08


def test_float_types_pass_through():
    x = torch.randn(3, 4)
    assert dequantize(("F32", x)).data_ptr() == x.data_ptr()
    assert dequantize(("F16", x.half())).dtype == torch.float32


def test_errors():
    with pytest.raises(UnsupportedError, match="IQ2_XXS.*Q4_K"):
        get_format("IQ2_XXS")
    with pytest.raises(ModelFormatError, match="uint8"):
        dequantize(("Q8_0", torch.zeros(2, 33, dtype=torch.uint8)))
    with pytest.raises(UnsupportedError, match="blocks of 32"):
        QUANT_FORMATS["Q4_0"].row_bytes(40)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", sorted(QUANT_FORMATS))
def test_cuda_matches_cpu(qtype):
    data = torch.from_numpy(random_packed(qtype, rows=5, blocks=4))
    torch.testing.assert_close(dequantize((qtype, data.cuda())).cpu(), dequantize((qtype, data)), rtol=0, atol=0)
