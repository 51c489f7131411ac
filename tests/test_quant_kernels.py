"""The packed GEMV and tile-dequant kernels against gguf's own dequantization and a float64 matmul.

Weights are random bytes with every f16 scale field overwritten by a sane finite value, so every
code path of each layout is exercised. On machines without CUDA the kernels run in Triton's
interpreter (conftest sets TRITON_INTERPRET=1); shapes are small for that reason.
"""

import numpy as np
import pytest
import torch
from helpers import interpreter_index_shim

gguf = pytest.importorskip("gguf")
pytest.importorskip("triton")

from lowgear.ops.matmul import dequantize_tile, packed_matmul, supports  # noqa: E402
from lowgear.ops.matmul.gguf_gemv import blocks_per_step, launch_params  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# block elements, block bytes, byte offsets of the f16 fields (d, and dmin / m where present)
LAYOUTS = {
    "Q8_0": (32, 34, (0,)),
    "Q4_0": (32, 18, (0,)),
    "Q4_1": (32, 20, (0, 2)),
    "Q5_0": (32, 22, (0,)),
    "Q5_1": (32, 24, (0, 2)),
    "Q4_K": (256, 144, (0, 2)),
    "Q5_K": (256, 176, (0, 2)),
    "Q6_K": (256, 210, (208,)),
    "Q2_K": (256, 84, (80, 82)),
    "Q3_K": (256, 110, (108,)),
    "IQ4_NL": (32, 18, (0,)),
    "IQ4_XS": (256, 136, (0,)),
}
QTYPES = list(LAYOUTS)
TILE_QTYPES = ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]  # with a Triton tile dequantizer; the rest use torch's


@pytest.fixture(autouse=True, scope="module")
def _interpreter_numpy_shim():
    with interpreter_index_shim():
        yield


def make_packed(qtype: str, n: int, k: int, seed: int = 0):
    """(uint8 torch tensor [n, bytes_per_row], float64 numpy dequantized [n, k])."""
    bs, bb, f16_offsets = LAYOUTS[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, k // bs, bb), dtype=np.uint8)
    for off in f16_offsets:
        scale = (rng.standard_normal((n, k // bs)) * 0.02).astype(np.float16)
        raw[:, :, off:off + 2] = scale.view(np.uint8).reshape(n, k // bs, 2)
    raw = raw.reshape(n, -1)
    ref = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype))
    return torch.from_numpy(raw.copy()), ref.reshape(n, k).astype(np.float64)


def rel_err(y: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(y.double().cpu().numpy() - ref).max() / (np.abs(ref).max() + 1e-30))


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_matmul_matches_gguf(qtype, m, dtype):
    n, k = 50, 512  # 50 rows: the last program's rows are partly out of range
    data, w = make_packed(qtype, n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = packed_matmul(x.to(DEVICE), qtype, data.to(DEVICE), n, k)
    assert y.shape == (m, n) and y.dtype == dtype
    ref = x.double().numpy() @ w.T
    assert rel_err(y, ref) < (2e-3 if dtype == torch.float16 else 1e-5)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_1", "Q4_K", "Q5_K", "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"])
def test_packed_matmul_leading_dims_and_odd_block_count(qtype):
    bs = LAYOUTS[qtype][0]
    n, k = 9, bs * 3  # 3 blocks: the K loop takes one block per step
    data, w = make_packed(qtype, n, k, seed=7)
    x = torch.randn(2, 2, k, generator=torch.Generator().manual_seed(2))
    y = packed_matmul(x.to(DEVICE), qtype, data.to(DEVICE), n, k)
    assert y.shape == (2, 2, n)
    assert rel_err(y.reshape(4, n), x.reshape(4, k).double().numpy() @ w.T) < 1e-5


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_float_weights(qtype):
    wdtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[qtype]
    n, k = 37, 300  # k not a multiple of BLOCK_K: the masked tail
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(n, k, generator=gen).to(wdtype)
    x = torch.randn(3, k, generator=gen)
    y = packed_matmul(x.to(DEVICE), qtype, w.to(DEVICE), n, k)
    assert rel_err(y, x.double().numpy() @ w.double().numpy().T) < 1e-5


@pytest.mark.parametrize("qtype", TILE_QTYPES)
def test_dequantize_tile_matches_gguf(qtype):
    n, k = 20, 512
    data, w = make_packed(qtype, n, k, seed=11)
    tile = dequantize_tile(qtype, data.to(DEVICE), 3, 17, torch.float32)
    assert tile.shape == (14, k)
    np.testing.assert_allclose(tile.cpu().double().numpy(), w[3:17], rtol=1e-6, atol=1e-7)
    half = dequantize_tile(qtype, data.to(DEVICE), 0, n, torch.float16)
    np.testing.assert_allclose(half.cpu().double().numpy(), w, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q3_K", "IQ4_XS"])
def test_prefill_path_uses_tiles(monkeypatch, qtype):
    """Past MAX_M rows: bands of dequantized rows (Triton tiles, or torch's for Q3_K / IQ4_XS) and a matmul."""
    import lowgear.ops.matmul as kernels

    monkeypatch.setattr(kernels, "PREFILL_BAND_ELEMS", 512 * 16)  # 16-row bands: 2 bands for 20 rows
    n, k = 20, 512
    data, w = make_packed(qtype, n, k, seed=5)
    x = torch.randn(kernels.MAX_M + 1, k, generator=torch.Generator().manual_seed(4))
    y = packed_matmul(x.to(DEVICE), qtype, data.to(DEVICE), n, k)
    assert rel_err(y, x.double().numpy() @ w.T) < 1e-5


def test_supports_and_launch_params():
    assert all(supports(q) for q in QTYPES + ["F16", "BF16", "F32"])
    assert not supports("Q8_1") and not supports("IQ2_XXS")
    assert blocks_per_step(128, 8) == 8 and blocks_per_step(28, 8) == 4
    assert blocks_per_step(56, 8) == 8 and blocks_per_step(3, 8) == 1
    assert launch_params("Q4_K", 4096, 14336)["NB"] == 1
    assert launch_params("Q4_0", 4096, 14336)["NB"] == 8


def test_bad_shapes_raise():
    data, _ = make_packed("Q4_0", 4, 64)
    with pytest.raises(ValueError):
        packed_matmul(torch.randn(1, 60).to(DEVICE), "Q4_0", data.to(DEVICE), 4, 60)
    with pytest.raises(ValueError):
        packed_matmul(torch.randn(1, 64).to(DEVICE), "Q4_0", data[:, :18].to(DEVICE), 4, 64)
    with pytest.raises(ValueError):
        packed_matmul(torch.randn(1, 64).to(DEVICE), "IQ2_XXS", data.to(DEVICE), 4, 64)
