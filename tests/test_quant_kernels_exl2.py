"""ops/matmul/exl2_gemv.py: the EXL2 split-K GEMV and prefill dequantizer against float64 references.

Random layers come from tests/test_exl2.py's packer (its float64 reference is computed from the
integer codes, not from lowgear's unpacking); ExLlamaV2's own fixture layers are checked against
`dequantize_exl2` in float64, which tests/test_exl2.py ties to ExLlamaV2's dequantization bit for
bit. On machines without CUDA the kernels run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1); shapes are small for that.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import compiled_results

pytest.importorskip("triton")

from test_exl2 import random_exl2
from test_quant_kernels_gptq import _interpreter_numpy_shim, rel_err, xs  # noqa: F401

from lowgear.model.linear import QuantLinear
from lowgear.ops import matmul as kernels
from lowgear.formats.exl2 import EXL2Weight, dequantize_exl2
from lowgear.ops.matmul import exl2_gemv as E
from lowgear.formats.hf import HFSource

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "exllamav2")


def linear(w: EXL2Weight, bias=None) -> QuantLinear:
    lin = QuantLinear(w, bias).to(DEVICE)
    lin.kernel = kernels.kernel_for(lin)
    assert lin.kernel is E.exl2_matmul
    return lin


TOL = {torch.float32: 1e-5, torch.float16: 4e-3}

# out features (not a multiple of BLOCK_N), groups as (bits, rows) in descending bits, padded width
LAYOUTS = {
    "2bit": (40, [(2, 32), (2, 16), (2, 64)], None),
    "3bit": (24, [(3, 32), (3, 64), (3, 32)], 32),
    "4bit": (72, [(4, 64), (4, 32), (4, 8)], None),
    "5bit": (16, [(5, 32), (5, 64), (5, 32)], None),
    "6bit": (48, [(6, 16), (6, 48), (6, 32)], 64),
    "8bit": (40, [(8, 32), (8, 4), (8, 128)], None),
    "mixed": (264, [(8, 32), (6, 32), (5, 32), (4, 64), (3, 32), (2, 16), (2, 32)], 288),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_gemv_matches_float64_every_bit_width(case):
    out, groups, pad = LAYOUTS[case]
    w, ref = random_exl2(out, groups, seed=len(case), pad_to=pad)
    torch.testing.assert_close(dequantize_exl2(w, dtype=torch.float64), ref, rtol=0, atol=0)
    lin = linear(w)
    for m in (1, 3):
        x = xs(m, ref.shape[1], seed=m)
        y = lin(x.to(DEVICE))
        assert y.shape == (m, out) and y.dtype == torch.float32
        assert rel_err(y, x.double() @ ref.T) < TOL[torch.float32]


@pytest.mark.parametrize("m", list(range(1, E.MAX_M + 1)) + [E.MAX_M + 1, 20])
def test_every_row_count_gemv_and_prefill(m):
    """M <= MAX_M runs the GEMV, past it the dequantize + matmul path; a bias and a leading batch dim."""
    out, groups, pad = LAYOUTS["mixed"]
    w, ref = random_exl2(out, groups, seed=3, pad_to=pad)
    bias = torch.randn(out, generator=torch.Generator().manual_seed(2))
    lin = linear(w, bias)
    x = xs(m, ref.shape[1], seed=m)
    y = lin(x.reshape(1, m, -1).to(DEVICE))
    assert y.shape == (1, m, out)
    assert rel_err(y[0], x.double() @ ref.T + bias.double()) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("name", ["exl2-2.6bpw", "exl2-4.5bpw"])
@pytest.mark.parametrize("layer", ["layers.0.down", "layers.1.down", "layers.0.q", "lm_head"])
def test_exllamav2_fixture_layers(name, layer, dtype):
    """ExLlamaV2's converter mixed 2/3, 3/5, 2/3/6, 4/8, 5/6 and 6/8-bit groups of 32-128 rows here."""
    folder = os.path.join(FIXTURES, name)
    if not os.path.isdir(folder):
        pytest.skip("tests/fixtures/exllamav2 not present")
    w = HFSource(folder).get(layer)
    ref = dequantize_exl2(w, dtype=torch.float64)
    lin = linear(w)
    for m in (1, E.MAX_M, E.MAX_M + 3):
        x = xs(m, w.in_features, seed=m, dtype=dtype)
        y = lin(x.to(DEVICE))
        assert y.dtype == dtype and y.shape == (m, w.out_features)
        assert rel_err(y, x.double() @ ref.T) < TOL[dtype], (m, rel_err(y, x.double() @ ref.T))


@pytest.mark.parametrize("warps", E.WARPS)
def test_both_launch_widths_and_their_split_tables(warps):
    out, groups, pad = LAYOUTS["mixed"]
    w, ref = random_exl2(out, groups, seed=7, pad_to=pad)
    lin = linear(w)
    x = xs(2, ref.shape[1]).to(DEVICE)
    y = E.exl2_gemv(x.index_select(1, lin.exl2_perm), lin, num_warps=warps)
    assert rel_err(y, x.double().cpu() @ ref.T) < TOL[torch.float32]
    assert lin._exl2_kernel["splits"][warps] > 1  # the split-K reduce ran


def test_single_group_stores_directly_and_identity_order():
    """One group: no split, the GEMV stores straight into y; no permutation: x is not gathered."""
    w, ref = random_exl2(24, [(4, 64)], seed=8, act_order=False)
    w = EXL2Weight(w.q_weight, w.q_scale, w.q_scale_max, w.q_groups, out_features=24)
    lin = linear(w)
    assert lin._exl2_kernel["splits"] == {2: 1, 4: 1} and not hasattr(lin, "exl2_perm")
    for m in (1, E.MAX_M + 1):
        x = xs(m, 64).to(DEVICE)
        assert rel_err(lin(x), x.double().cpu() @ ref.T) < TOL[torch.float32]


def test_prefill_dequantizer_is_exact_in_packed_order():
    out, groups, pad = LAYOUTS["mixed"]
    w, ref = random_exl2(out, groups, seed=9, pad_to=pad)
    lin = linear(w)
    perm = lin.exl2_perm.long().cpu()
    for dtype in (torch.float32, torch.float16):
        wt = E.dequantize_t(lin, 5, 200, dtype)
        assert wt.shape == (ref.shape[1], 195) and wt.dtype == dtype
        torch.testing.assert_close(wt.cpu(), ref[5:200, perm].T.to(dtype), rtol=0, atol=0)


def test_prepare_leaves_stored_buffers_alone():
    out, groups, pad = LAYOUTS["mixed"]
    w, ref = random_exl2(out, groups, seed=10, pad_to=pad, store="perm")
    lin = QuantLinear(w).to(DEVICE)
    before = {name: buf.clone() for name, buf in lin.named_buffers()}
    x = xs(3, ref.shape[1]).to(DEVICE)
    y_torch = lin(x)
    lin.kernel = kernels.kernel_for(lin)
    for name, buf in before.items():
        assert torch.equal(getattr(lin, name), buf), name
    torch.testing.assert_close(lin(x), y_torch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.dequantized(torch.float64).cpu(), ref, rtol=0, atol=0)
    assert lin.exl2_scale_codes.dtype == torch.uint8 and lin.exl2_scale_codes.shape == (len(groups), pad)
    facts = lin._exl2_kernel
    assert kernels.kernel_for(lin) is E.exl2_matmul and lin._exl2_kernel is facts  # prepared once


def test_bfloat16_activations_and_dtype_moves_after_prepare():
    w, ref = random_exl2(40, [(6, 32), (4, 64), (2, 32)], seed=12)
    lin = linear(w).to(torch.bfloat16)  # the prepared fp16 smax is held as int16 bits: not rounded
    assert not any(b.is_floating_point() for b in lin.buffers())
    for m in (1, E.MAX_M + 1):
        x = xs(m, 128, seed=m, dtype=torch.bfloat16)
        y = lin(x.to(DEVICE))
        assert y.dtype == torch.bfloat16 and rel_err(y, x.double() @ ref.T) < 2e-2
    x = xs(2, 128)
    assert rel_err(lin(x.to(DEVICE)), x.double() @ ref.T) < TOL[torch.float32]


def test_tile_rows_and_splits():
    assert [E.row_group(b) for b in (2, 3, 4, 5, 6, 8)] == [(16, 1), (32, 3), (8, 1), (32, 5), (16, 3), (4, 1)]
    assert E.tile_row_groups([8, 4, 1], 4) == 1
    assert E.tile_row_groups([8, 16], 8) == 8  # capped at TILE_WORDS words
    assert E.tile_row_groups([4, 2], 6) == 2 and E.tile_row_groups([2], 5) == 1
    assert E.split_groups([4, 4, 4, 1, 1, 1], 3) == [0, 2, 3, 6]
    assert E.split_groups([4], 5) == [0, 1]
    assert E.split_groups([1] * 5, 2) == [0, 3, 5]
    for words in ([5, 5, 5, 3, 3, 2, 2, 2, 1], [1] * 100, [9, 1, 1]):
        for n in (1, 2, 4, 7, 50):
            s = E.split_groups(words, n)
            assert s[0] == 0 and s[-1] == len(words) and all(a < b for a, b in itertools.pairwise(s))
            assert len(s) - 1 <= n


def test_kernel_for_without_triton_keeps_the_torch_path(monkeypatch):
    w, _ = random_exl2(32, [(4, 32)])
    lin = QuantLinear(w)
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    assert kernels.kernel_for(lin) is None


# ---------------------------------------------------------------- old GPUs

COMPILE_SCRIPT = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowgear.ops.matmul import exl2_gemv as E

GEMV = {"x_ptr": "*fp16", "qw_ptr": "*i32", "sc_ptr": "*u8", "tab_ptr": "*i32", "smax_ptr": "*fp16",
        "split_ptr": "*i32", "y_ptr": "*fp32", "part_ptr": "*fp32", "cnt_ptr": "*i32", "N": "i32", "N_OUT": "i32", "stride_xm": "i32"}
DEQ = {"qw_ptr": "*i32", "sc_ptr": "*u8", "tab_ptr": "*i32", "smax_ptr": "*fp16", "out_ptr": "*fp16",
       "N": "i32", "col0": "i32", "band": "i32"}
RED = {"part_ptr": "*fp32", "y_ptr": "*fp16", "MN": "i32", "SPLITS": "i32"}
R = {f"R{b}": E.tile_row_groups([4], b) for b in (2, 3, 4, 5, 6, 8)}  # 128-row groups

def gemv(m):
    return dict(M=m, M_PAD=triton.next_power_of_2(m), BLOCK_N=128 * E.launch_warps(m), S_CHUNK=4, PDL=False, **R)

CASES = [(f"gemv_m{m}", E.exl2_gemv_kernel, GEMV, gemv(m), E.launch_warps(m), True) for m in (1, 4, E.MAX_M)]
CASES += [("dequant", E.exl2_dequant_t_kernel, DEQ, dict(BLOCK_K=32, BLOCK_N=128), 4, False)]

out = {}
for cap in (70, 75):
    for name, kernel, args, consts, warps, is_gemv in CASES:
        sig = {a: args.get(a, "constexpr") for a in kernel.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(kernel.arg_names)
                 if a in args and (args[a].startswith("*") or a in ("N", "N_OUT", "stride_xm"))}
        try:
            c = triton.compile(ASTSource(kernel, sig, constexprs=consts, attrs=attrs),
                               target=GPUTarget("cuda", cap, 32), options={"num_warps": warps})
            ptx = c.asm["ptx"]
            out[f"sm_{cap}/{name}"] = dict(ok=True, gemv=is_gemv, mma=len(re.findall(r"\b(?:wg)?mma\.", ptx)),
                                           shared=c.metadata.shared, cvt=len(re.findall(r"cvt\.rn\.f32\.[su]32", ptx)),
                                           v4=len(re.findall(r"ld\.global(?:\.nc)?\.v4", ptx)),
                                           bar=len(re.findall(r"bar\.sync", ptx)))
        except Exception as exc:
            out[f"sm_{cap}/{name}"] = dict(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
print("RESULTS" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled() -> dict:
    return compiled_results(COMPILE_SCRIPT, timeout=900)


def test_exl2_kernels_compile_for_volta_and_turing(compiled):
    failed = {name: r["error"] for name, r in compiled.items() if not r["ok"]}
    assert not failed, failed
    assert len(compiled) == 2 * 4


def test_exl2_gemv_stays_in_registers(compiled):
    """No tensor-core mma, no int->float cvt per code (the exponent trick), 16-byte weight loads, and
    no shared memory or barrier but split-K's finish (`splitk.finish`: one barrier before the tile
    counter, and the counter's value broadcast through 4 bytes of shared memory with one or two more,
    2 in all with Triton 3.6, 3 with 3.9): a layout conversion per group or per code would need
    kilobytes of shared memory."""
    for name, r in compiled.items():
        if r["gemv"]:
            assert r["mma"] == 0 and r["shared"] <= 4 and r["bar"] <= 3 and r["v4"] > 0, (name, r)
            assert r["cvt"] <= 8, (name, r)


def test_no_tl_dot_in_exl2_source():
    assert not re.search(r"tl\.dot\(", Path(E.__file__).read_text())


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_gemv_matches_torch_dequantize_on_a_4096_square_layer(dtype):
    """A 4096 x 4096 act-order layer of 8/6/5/4/3/2-bit groups (32-128 rows): the CUDA GEMV (M = 1, 4)
    and the prefill path (M = 33) against torch's dequantize + matmul in float32."""
    groups = [(8, 128), (6, 256), (5, 384), (4, 1024), (4, 32), (3, 1152), (3, 64), (2, 1024), (2, 32)]
    assert sum(r for _, r in groups) == 4096
    w, _ = random_exl2(4096, groups, seed=11)
    lin = linear(w)
    assert lin.qweight.is_cuda
    ref_w = dequantize_exl2(lin.exl2_weight(), dtype=torch.float32)  # on the GPU, exact in float32
    for m in (1, 4, 33):
        x = xs(m, 4096, seed=m).to(device="cuda", dtype=dtype)
        y = lin(x)
        torch.cuda.synchronize()
        ref = x.float() @ ref_w.T
        assert y.dtype == dtype and y.shape == (m, 4096)
        err = float((y.float() - ref).abs().max() / ref.abs().max())
        assert err < (4e-3 if dtype == torch.float16 else 2e-2), (m, err)
    y1 = lin(x[:1])
    assert torch.equal(lin(x[:1]), y1)  # split-K sums in a fixed order: replays are bit-identical
