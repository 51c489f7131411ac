"""The packed-half2 4-bit unpack (ops/matmul/f16x2.py): its arithmetic on the CPU, the kernel on the GPU.

The PTX cannot run in the interpreter, so the CPU tests check `dot8_reference` (the same steps in
numpy float16) against float64: the exponent trick gives code - zero exactly for every code, lane
and zero point, and the half2 dot product stays within fp16 rounding of the exact sum. The GPU test
runs the GEMV with the half2 unpack against float64 on Llama-3-8B shapes and against the fp32 unpack.
The old-GPU compile test (test_quant_kernels_gptq.py) assembles it for sm_70 / sm_75.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowgear.ops.matmul import f16x2


def _pack(codes: np.ndarray) -> np.ndarray:
    """codes [..., 8] in 0..15 -> uint32 words, code j at bits 4j."""
    shifts = (4 * np.arange(8)).astype(np.uint32)
    return np.bitwise_or.reduce(codes.astype(np.uint32) << shifts, axis=-1).astype(np.uint32)


@pytest.mark.parametrize("zero", [0.0, 1.0, 8.0, 9.0, 15.0, 16.0])
def test_code_minus_zero_is_exact_for_every_code_and_lane(zero):
    codes = np.stack([np.roll(np.arange(16), s)[:8] for s in range(16)])  # every code in every lane
    words = _pack(codes)
    for j in range(8):
        x = np.zeros((16, 8), dtype=np.float16)
        x[:, j] = 1.0
        got = f16x2.dot8_reference(words, x, np.full(16, zero))
        np.testing.assert_array_equal(got, (codes[:, j] - zero).astype(np.float32))


def test_dot8_is_the_dot_product_within_fp16_rounding():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(4096, 8))
    zero = rng.integers(0, 17, size=4096).astype(np.float64)
    x = (rng.standard_normal((4096, 8)) * rng.choice([0.05, 1.0, 30.0], size=(4096, 1))).astype(np.float16)
    got = f16x2.dot8_reference(_pack(codes), x, zero)
    terms = (codes - zero[:, None]) * x.astype(np.float64)
    want = terms.sum(-1)
    # two lanes of four terms, each term and partial sum rounded to fp16 once: a few ulps of 2**-11
    bound = 6 * 2.0**-11 * np.abs(terms).sum(-1)
    assert np.all(np.abs(got - want) <= bound + 1e-7)
    assert np.abs(got - want).max() > 0  # rounding does happen: the bound is what is being tested


def test_dot8_does_not_overflow_at_the_largest_activations():
    """(code - zero) reaches 16 in magnitude and four products share a lane: unscaled, any |x| past
    ~1000 would overflow fp16 (LLMs' massive activations reach thousands); `pairs` scales x by 2**-6."""
    rng = np.random.default_rng(1)
    codes = np.where(rng.random((512, 8)) < 0.5, 0, 15)
    zero = np.where(rng.random(512) < 0.5, 16.0, 0.0)
    x = (rng.choice([-1.0, 1.0], size=(512, 8)) * rng.choice([1000.0, 8000.0, 65504.0], size=(512, 1))).astype(np.float16)
    x = np.where(((codes - zero[:, None]) * x.astype(np.float64)) >= 0, np.abs(x), -np.abs(x)).astype(np.float16)
    got = f16x2.dot8_reference(_pack(codes), x, zero)
    terms = (codes - zero[:, None]) * x.astype(np.float64)
    assert np.all(np.isfinite(got))
    assert np.all(np.abs(got - terms.sum(-1)) <= 6 * 2.0**-11 * np.abs(terms).sum(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,x_scale", [(6144, 4096, 1.0), (4096, 4096, 1.0), (28672, 4096, 1.0), (4096, 14336, 1.0),
                                         (1000, 640, 1.0), (4096, 14336, 3000.0)])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_half2_gemv_matches_float64_on_the_gpu(n, k, x_scale, m):
    from test_quant_kernels_gptq import make_gptq

    from lowgear.model.linear import QuantLinear
    from lowgear.formats.gptq import dequantize_gptq
    from lowgear.ops.matmul import gptq_gemv as G

    torch.manual_seed(n + k + m)
    w, _ = make_gptq(4, n, k, 128)
    ref_w = dequantize_gptq(w, dtype=torch.float64)  # [N, K]
    lin = QuantLinear(w).to("cuda")
    facts = G.prepare(lin)
    x = torch.randn(m, k, device="cuda")
    if x_scale > 1:  # LLMs' massive activations: a few features thousands of times the rest
        idx = torch.randperm(k, device="cuda")[:8]
        x[:, idx] = x_scale * torch.sign(torch.randn(m, 8, device="cuda"))
    x = x.half()
    want = x.double() @ ref_w.cuda().T
    args = (x, lin.qweight, lin.gptq_zeros, lin.scales, None, 4, 128, facts["block_r"])
    assert G.uses_half2(x, 4, None)
    fast = G.gptq_gemv(*args, half2=True).double()
    plain = G.gptq_gemv(*args, half2=False).double()
    assert torch.isfinite(fast).all()
    scale = want.abs().max()
    # the fp32 unpack is the reference kernel; half2 adds fp16 partial sums of 4 terms
    assert (plain - want).abs().max() <= 2e-3 * scale
    assert (fast - want).abs().max() <= 4e-3 * scale
    assert (fast - want).norm() <= 2.5 * (plain - want).norm() + 1e-3 * scale


def test_a_word_of_ones_gives_the_sum_of_x():
    """The float-zero GEMV (GGUF minima) takes zero * sum(x) off each tile, with sum(x) from dot8 on the
    word 0x11111111 (eight codes 1) and zero 0: the sum of the eight activations."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((256, 8)).astype(np.float16)
    got = f16x2.dot8_reference(np.full(256, 0x11111111, dtype=np.uint32), x, np.zeros(256))
    want = x.astype(np.float64).sum(-1)
    assert np.all(np.abs(got - want) <= 4 * 2.0**-11 * np.abs(x.astype(np.float64)).sum(-1) + 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["Q4_K", "Q4_1"])
@pytest.mark.parametrize("m", [1, 2])
def test_half2_gemv_with_float_zeros_matches_float64_on_the_gpu(qtype, m):
    """A GGUF layer with block minima (float zeros) through the half2 and fp32 unpacks on the GPU."""
    from lowgear.bench.synthetic.common import random_blocks
    from lowgear.formats.dequant import dequantize_data
    from lowgear.formats.gptq import dequantize_gptq
    from lowgear.ops.matmul import gptq_gemv as G
    from lowgear.ops.matmul.repack import gguf_to_gptq

    n, k = 4096, 4096
    data = torch.from_numpy(random_blocks(np.random.default_rng(m), qtype, n, k, std=0.02)).cuda()
    w = gguf_to_gptq(qtype, data, k)
    assert w is not None and w.float_zeros is not None
    ref_w = dequantize_gptq(w, dtype=torch.float64)
    gguf_w = dequantize_data(qtype, data, torch.float32).double()
    assert ((ref_w - gguf_w).abs().max() / gguf_w.abs().max()).item() < 2e-3
    x = torch.randn(m, k, device="cuda").half()
    want = x.double() @ ref_w.T
    args = (x, w.qweight, w.float_zeros, w.scales, None, 4, 32, G.gemv_tile_rows(4, 32, k))
    fast = G.gptq_gemv(*args, half2=True, float_z=True).double()
    plain = G.gptq_gemv(*args, half2=False, float_z=True).double()
    scale = want.abs().max()
    assert (plain - want).abs().max() <= 2e-3 * scale
    assert (fast - want).abs().max() <= 6e-3 * scale
