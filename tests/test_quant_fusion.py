"""quant/fusion.py through the GPTQ GEMV: x read as RMSNorm(h) or silu(gate) * up, y added into h.

The kernel runs in Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1), the half2
unpack on CUDA (tests/test_quant_fusion_gpu.py runs this file's cases there too). References:

- x: `fusion.reference_x`, torch's own ops, checked here against the textbook RMSNorm and SwiGLU in
  float64 (it only adds the unfused kernels' roundings);
- y: float64 x @ W.T, W from the random integer codes (tests/test_quant_kernels_gptq.py's
  `make_gptq`, which does not share lowgear's unpacking);
- the residual output: the old h plus that y rounded, and the row sums of squares of the result.

Shapes include an N that is not a multiple of the column tile (so the last tile is partial), 3
rows (padded to 4), 3-bit codes (words that straddle), act-order, and ss given in several parts.
"""

from __future__ import annotations

import pytest
import torch
from helpers import interpreter_index_shim
from test_quant_kernels_gptq import make_gptq

pytest.importorskip("triton")

from lowgear.model.quant_linear import QuantLinear  # noqa: E402
from lowgear.quant import kernels  # noqa: E402
from lowgear.quant.fusion import GluIn, NormIn, reference_x, sum_squares  # noqa: E402
from lowgear.quant.kernels import gptq as G  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32

CASES = [  # bits, N, K, group_size, act_order, M
    (4, 200, 256, 64, False, 1),
    (4, 136, 128, 32, True, 3),
    (3, 96, 128, -1, False, 2),
    (8, 64, 192, 64, False, 4),
]


@pytest.fixture(autouse=True, scope="module")
def _interpreter_numpy_shim():
    with interpreter_index_shim():
        yield


def layer(bits, n, k, gs, act_order, seed=0):
    w, ref = make_gptq(bits, n, k, gs, act_order=act_order, seed=seed)
    module = QuantLinear(w).to(DEVICE)
    module.kernel = kernels.kernel_for(module)
    module.fusion = kernels.fusion_for(module)
    return module, ref.to(DEVICE)


def parts(h: torch.Tensor, n_parts: int) -> torch.Tensor:
    """h's row sums of squares in n_parts column slices, [n_parts, M] float32."""
    return torch.stack([c.float().pow(2).sum(-1) for c in h.tensor_split(n_parts, dim=1)]).contiguous()


def y_ref(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return x.double() @ ref.double().T


def close(got, want, scale):
    tol = 2e-2 if DTYPE == torch.float16 else 1e-4
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * scale, (err, scale)


def test_reference_x_is_rmsnorm_and_swiglu():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    w = torch.rand(40, generator=gen, dtype=torch.float64) + 0.5
    want = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    got = reference_x(NormIn(h.float(), parts(h.float(), 3), w.float(), 1e-5))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    gu = torch.randn(3, 80, generator=gen, dtype=torch.float64)
    want = torch.nn.functional.silu(gu[:, :40]) * gu[:, 40:]
    torch.testing.assert_close(reference_x(GluIn(gu.float())).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,n,k,gs,act_order,m", CASES)
def test_norm_input(bits, n, k, gs, act_order, m):
    module, ref = layer(bits, n, k, gs, act_order)
    gen = torch.Generator().manual_seed(1)
    h = (torch.randn(m, k, generator=gen) * 3).to(DEVICE, DTYPE)
    weight = (torch.rand(k, generator=gen) + 0.5).to(DEVICE)
    x_in = NormIn(h, parts(h, 5), weight, 1e-5)
    assert module.fuses(m, DTYPE)
    got = module.fused(x_in)
    x = reference_x(x_in)
    close(got, y_ref(x, ref), y_ref(x, ref).abs().max().item())
    # the same as the plain GEMV on that x (one rounding of x apart at most)
    close(got, module(x), y_ref(x, ref).abs().max().item())


@pytest.mark.parametrize("bits,n,k,gs,act_order,m", CASES)
def test_glu_input(bits, n, k, gs, act_order, m):
    module, ref = layer(bits, n, k, gs, act_order, seed=2)
    gen = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(m, 2 * k, generator=gen) * 2).to(DEVICE, DTYPE)
    got = module.fused(GluIn(gate_up))
    x = reference_x(GluIn(gate_up))
    close(got, y_ref(x, ref), y_ref(x, ref).abs().max().item())


@pytest.mark.parametrize("bits,n,k,gs,act_order,m", CASES)
def test_residual_output(bits, n, k, gs, act_order, m):
    module, ref = layer(bits, n, k, gs, act_order, seed=4)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(m, k, generator=gen).to(DEVICE, DTYPE)
    h0 = (torch.randn(m, n, generator=gen) * 4).to(DEVICE, DTYPE)
    h = h0.clone()
    out, ss = module.fused(x, residual=h)
    assert out.data_ptr() == h.data_ptr()  # in place
    want = (h0.double() + y_ref(x, ref)).to(DTYPE)
    close(h, want, want.abs().max().item())
    tiles = -(-n // G.launch_params(n, k, bits, module._gptq_kernel["block_r"], m)["BLOCK_N"])
    assert ss.shape == (tiles, m) and ss.dtype == torch.float32
    torch.testing.assert_close(ss.sum(0), sum_squares(h)[0], rtol=1e-4, atol=1e-3)


def test_chain_norm_glu_residual():
    """o-like residual output -> its ss read by a NormIn -> GluIn -> residual again (a layer's order)."""
    k, inter = 128, 192
    o, o_ref = layer(4, k, k, 32, False, seed=6)
    gu, gu_ref = layer(4, 2 * inter, k, 32, False, seed=7)
    down, down_ref = layer(4, k, inter, 64, False, seed=8)
    gen = torch.Generator().manual_seed(9)
    attn = torch.randn(2, k, generator=gen).to(DEVICE, DTYPE)
    h = (torch.randn(2, k, generator=gen) * 2).to(DEVICE, DTYPE)
    norm_w = (torch.rand(k, generator=gen) + 0.5).to(DEVICE)
    h_ref = h.double().clone()
    _, ss = o.fused(attn, residual=h)
    h_ref += y_ref(attn, o_ref)
    x = NormIn(h, ss, norm_w, 1e-5)
    g = gu.fused(x)
    xr = h_ref / torch.sqrt(h_ref.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w.double()
    g_ref = y_ref(xr, gu_ref)
    close(g, g_ref, g_ref.abs().max().item())
    _, ss = down.fused(GluIn(g), residual=h)
    a = torch.nn.functional.silu(g_ref[:, :inter]) * g_ref[:, inter:]
    h_ref += a @ down_ref.double().T
    close(h, h_ref, h_ref.abs().max().item())
    torch.testing.assert_close(ss.sum(0), sum_squares(h)[0], rtol=1e-3, atol=1e-3)


def test_fuses_gemv_and_mma_rows_only():
    module, _ = layer(4, 64, 128, 32, False)
    assert module.fuses(1, DTYPE) and module.fuses(G.MAX_M, DTYPE)
    assert not module.fuses(G.MAX_M + 1, DTYPE) or DEVICE == "cuda"
    # on sm_80+ the tl.dot kernel's rows fuse too (up to its MMA_MAX_M); past them dequantize + cuBLAS does not
    assert G.fusable(module, 16, torch.float16, capability=(9, 0))
    assert not G.fusable(module, 16, torch.float16, capability=(7, 5))
    assert not G.fusable(module, G.gptq_mma.MMA_MAX_M + 1, torch.float16, capability=(9, 0))
    module.bias = torch.nn.Parameter(torch.zeros(64, device=DEVICE), requires_grad=False)
    assert module.fuses(1, DTYPE) and not module.fuses(1, DTYPE, residual=True)


@pytest.mark.parametrize("bits,m", [(4, 6), (8, 16)])
def test_mma_kernel_fusions(bits, m):
    """The tl.dot kernel (batched decode on sm_80+; interpreted here) with the three fusions, in float16."""
    n, k = 80, 128
    module, ref = layer(bits, n, k, 32, False, seed=10)
    gen = torch.Generator().manual_seed(11)
    h = torch.randn(m, k, generator=gen).to(DEVICE, torch.float16)
    norm_in = NormIn(h, parts(h, 3), (torch.rand(k, generator=gen) + 0.5).to(DEVICE), 1e-5)
    glu_in = GluIn(torch.randn(m, 2 * k, generator=gen).to(DEVICE, torch.float16))
    for x_in in (norm_in, glu_in):
        x = reference_x(x_in)
        want = y_ref(x, ref)
        got = G.gptq_fused(module, x_in, capability=(9, 0))
        err = (got.double() - want).abs().max().item()
        assert err <= 2e-2 * want.abs().max().item(), (type(x_in).__name__, err)
    res = (torch.randn(m, n, generator=gen) * 4).to(DEVICE, torch.float16)
    h0 = res.clone()
    x = torch.randn(m, k, generator=gen).to(DEVICE, torch.float16)
    _, ss = G.gptq_fused(module, x, residual=res, capability=(9, 0))
    want = h0.double() + y_ref(x, ref)
    assert (res.double() - want).abs().max().item() <= 2e-2 * want.abs().max().item()
    torch.testing.assert_close(ss.sum(0), sum_squares(res)[0], rtol=1e-3, atol=1e-2)
