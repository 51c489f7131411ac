"""ops/matmul/float_gemv.py: the float16 / bfloat16 decode GEMV against float64 x @ w.T.

On machines without CUDA the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1),
on small shapes; on a GPU the same cases run compiled. Shapes include N that is not a multiple of
the row block, K that is not a multiple of BLOCK_K, 1-4 rows (3 pads to 4), forced K-splits (the
last program of a row block adds the partials), and the QuantLinear routing: the GEMV for one
row (where it was measured faster), cuBLAS / torch past it and for float32.
"""

from __future__ import annotations

import pytest
import torch
from helpers import interpreter_index_shim

pytest.importorskip("triton")

from lowgear.model.linear import QuantLinear  # noqa: E402
from lowgear.ops import matmul as kernels
from lowgear.ops.matmul import float_gemv as F  # noqa: E402
from lowgear.ops.matmul import splitk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _interpreter_numpy_shim():
    with interpreter_index_shim():
        yield


def problem(m, n, k, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(DEVICE, dtype)
    return x, w, x.double().cpu() @ w.double().cpu().T


def check(y, ref, dtype):
    # fp32 sums of exact products; the output rounded once to the activation dtype
    tol = (2.0**-10 if dtype == torch.float16 else 2.0**-7) * ref.abs().max().item() + 1e-6
    assert (y.double().cpu() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("m,n,k,split", [(1, 40, 300, None), (2, 33, 512, 3), (3, 70, 200, 2), (4, 16, 1000, 4),
                                         (1, 130, 64, 1)])
def test_gemv_matches_float64(m, n, k, split):
    x, w, ref = problem(m, n, k, seed=m * 7 + n)
    y = F.float_gemv(x, w, split=split)
    assert y.shape == (m, n) and y.dtype == x.dtype
    check(y, ref, x.dtype)
    assert int(splitk.counters(x.device, 1).abs().sum()) == 0  # left clean for the next launch
    assert torch.equal(F.float_gemv(x, w, split=split), y)  # the partials added in split order


@pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter has no bfloat16")
def test_gemv_bfloat16():
    x, w, ref = problem(2, 96, 320, torch.bfloat16)
    check(F.float_gemv(x, w), ref, torch.bfloat16)


def test_launch_params_split_k_until_enough_programs():
    p = F.launch_params(4096, 4096, 1)
    assert p["BLOCK_N"] * p["BLOCK_K"] // (32 * p["num_warps"]) == 32  # accumulator per thread
    assert p["BLOCK_K"] == F.BLOCK_K and p["split"] == 1  # 512 row blocks: enough programs unsplit
    small = F.launch_params(2048, 2048, 1)  # too few row blocks: K is split to fill the GPU
    assert small["split"] > 1 and (2048 // small["BLOCK_N"]) * small["split"] >= F.TARGET_PROGRAMS
    head = F.launch_params(128256, 4096, 1)  # a vocabulary-sized head: rows enough, shorter K slices
    assert head["split"] == 1 and head["BLOCK_K"] == F.BLOCK_K_MANY_ROWS
    assert head["BLOCK_N"] * head["BLOCK_K"] // (32 * head["num_warps"]) == 32
    big = F.launch_params(4096, 14336, 4)
    assert big["k_per_split"] % big["BLOCK_K"] == 0 and big["split"] * big["k_per_split"] >= 14336
    short = F.launch_params(96, 128, 1)  # K under one slice: the slice shrinks to K
    assert short["BLOCK_K"] == 128 and short["split"] == 1


def test_quant_linear_routes_decode_rows_to_the_gemv(monkeypatch):
    x, w, _ = problem(5, 24, 128)
    lin = QuantLinear(w.clone(), bias=torch.arange(24, dtype=torch.float16, device=DEVICE))
    lin.kernel = kernels.float_kernel_for(lin)
    assert lin.kernel is F.float_matmul
    calls = []
    real = F.float_gemv
    monkeypatch.setattr(F, "float_gemv", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    want = x.float() @ w.float().T + lin.bias.float()
    for rows in (1, 3, 5):
        y = lin(x[:rows])
        assert (y.float() - want[:rows]).abs().max().item() < 2e-2
    assert calls == [1]  # 3 and 5 rows: torch's matmul (cuBLAS on a GPU)
    y3 = lin(x[:3].reshape(3, 1, 128))  # leading dims kept
    assert y3.shape == (3, 1, 24)
    assert kernels.float_kernel_for(QuantLinear(w.float())) is None  # float32 keeps torch's matmul
