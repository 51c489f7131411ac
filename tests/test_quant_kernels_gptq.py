"""ops/matmul/gptq_gemv.py: the GPTQ split-K GEMV and prefill dequantizer against a float64 reference.

GPTQ tensors are built here from random integer codes, zeros and fp16 scales with a local packer
(tests/test_gptq.py packs the same format from a quantizer), and the reference is W = (q - z) * s in
float64 from those integers, so it does not share lowgear's unpacking. On machines without CUDA the
kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1); shapes are small for that.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch
from helpers import compiled_results, interpreter_index_shim

pytest.importorskip("triton")

from lowgear.model.linear import QuantLinear  # noqa: E402
from lowgear.ops import matmul as kernels
from lowgear.formats.gptq import GPTQWeight, dequantize_gptq  # noqa: E402
from lowgear.ops.matmul import gptq_gemv as G

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _interpreter_numpy_shim():
    with interpreter_index_shim():
        yield


def pack_stream(vals: np.ndarray, bits: int) -> np.ndarray:
    """ints [n, m] -> int32 [n * bits / 32, m]: each column one little-end-first bit stream."""
    n, m = vals.shape
    stream = (vals[:, None, :] >> np.arange(bits)[None, :, None]) & 1  # [n, bits, m]
    stream = stream.reshape(n * bits // 32, 32, m).astype(np.uint64)
    return (stream << np.arange(32, dtype=np.uint64)[None, :, None]).sum(axis=1).astype(np.uint32).view(np.int32)


def make_gptq(bits, n, k, group_size, act_order=False, v2=False, seed=0, uneven=False):
    """(GPTQWeight, float64 W [n, k]) from random codes; act_order scatters the groups over K."""
    rng = np.random.default_rng(seed)
    groups = 1 if group_size == -1 or group_size >= k else -(-k // group_size)
    g = np.arange(k) // (k if groups == 1 else group_size)
    if act_order:
        g = g[rng.permutation(k)]
    if uneven:  # groups of unequal sizes (not what GPTQ writes, but a g_idx can say it)
        g = np.sort(rng.integers(0, groups, k))[rng.permutation(k)]
    q = rng.integers(0, 1 << bits, (k, n))
    z = rng.integers(0 if v2 else 1, 1 << bits, (groups, n))  # v1 stores z - 1, so z >= 1
    s = (rng.random((groups, n)) * 0.02 + 0.002).astype(np.float16)
    ref = ((q - z[g]) * s[g].astype(np.float64)).T
    stored = z - (0 if v2 else 1)
    w = GPTQWeight(torch.from_numpy(pack_stream(q, bits)), torch.from_numpy(pack_stream(stored.T, bits).T.copy()),
                   torch.from_numpy(s), torch.tensor(g, dtype=torch.int32) if (act_order or uneven) else None,
                   bits, group_size, False, 0 if v2 else 1)
    return w.validate(), torch.from_numpy(np.ascontiguousarray(ref))


def linear(w: GPTQWeight, bias=None) -> QuantLinear:
    lin = QuantLinear(w, bias).to(DEVICE)
    lin.kernel = kernels.kernel_for(lin)
    assert lin.kernel is G.gptq_matmul
    return lin


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double().cpu() - ref).abs().max() / ref.abs().max())


def xs(m, k, seed=1, dtype=torch.float32):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


# bits, n, k, group size: K not a multiple of the group (the last group short) where GPTQ allows it
SHAPES = [(4, 96, 160, 32), (4, 264, 160, 64), (4, 96, 160, -1), (2, 64, 160, 32), (2, 96, 192, 64),
          (8, 48, 96, 32), (8, 40, 160, 64), (3, 96, 224, 64), (3, 64, 128, 32), (3, 32, 96, -1)]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,n,k,gs", SHAPES)
def test_gemv_matches_float64(bits, n, k, gs, act_order):
    w, ref = make_gptq(bits, n, k, gs, act_order, v2=bits % 2 == 0, seed=bits + k)
    torch.testing.assert_close(dequantize_gptq(w, dtype=torch.float64), ref, rtol=0, atol=0)
    lin = linear(w)
    assert lin._gptq_kernel["block_r"] is not None
    assert lin._gptq_kernel["sorted"] == (act_order and gs != -1)
    for m in (1, 3):
        x = xs(m, k, seed=m)
        y = lin(x.to(DEVICE))
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert rel_err(y, x.double() @ ref.T) < 1e-5


@pytest.mark.parametrize("bits,gs,act_order", [(4, 32, False), (4, 16, True), (8, 16, False), (6, 16, True),
                                              (3, 32, False), (2, 32, True), (4, 48, False)])
def test_tiles_that_span_groups(bits, gs, act_order):
    """span: tiles of GEMV_TILE_ROWS row-groups over groups of 16-32 inputs (1-4 row-groups), each row-group scaled by
    its own group's scale and zero (asymmetric zeros, so every group's differs). Against float64, at 1-8 rows, with
    split-K. Groups of 48 (6 row-groups: no power-of-two tile holds whole ones) keep the group's own tiles."""
    n, k = 96, 384
    w, ref = make_gptq(bits, n, k, gs, act_order, v2=True, seed=bits + gs)
    lin = linear(w)
    pack, _ = G.pack_shape(bits)
    group_rows = gs // pack
    for m in (1, 3, G.MAX_M):
        x = xs(m, k, seed=m).to(DEVICE)
        p = G.launch_params(n, k, bits, lin._gptq_kernel["block_r"], m, span=True)
        if m < G.MAX_M and gs != 48:  # (at 8 rows the activation slice caps tiles at 4 row-groups)
            assert group_rows % p["BLOCK_R"] != 0 and p["BLOCK_R"] % group_rows == 0, (p, group_rows)  # whole groups
        for split in (None, 5):
            y = G.gptq_gemv(x, lin.qweight, lin.gptq_zeros, lin.scales, getattr(lin, "gptq_perm", None), bits, gs,
                            lin._gptq_kernel["block_r"], split=split, span=True)
            assert rel_err(y, x.double().cpu() @ ref.T) < 1e-5, (m, split)


@pytest.mark.parametrize("m", [1, 2, 4, 7, G.MAX_M, G.MAX_M + 1, 40])
def test_every_row_count_gemv_and_prefill(m):
    """M <= MAX_M runs the GEMV (tile rows shrink as M grows), past it the dequantize + matmul path."""
    w, ref = make_gptq(4, 264, 256, 64, act_order=True, v2=False, seed=3)
    bias = torch.randn(264, generator=torch.Generator().manual_seed(2))
    lin = linear(w, bias)
    x = xs(m, 256, seed=m)
    y = lin(x.reshape(1, m, 256).to(DEVICE))
    assert y.shape == (1, m, 264)
    assert rel_err(y[0], x.double() @ ref.T + bias.double()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_activations(dtype):
    w, ref = make_gptq(4, 96, 256, 128, act_order=True, seed=5)
    lin = linear(w)
    for m in (1, 2, 20):
        x = xs(m, 256, dtype=dtype)
        y = lin(x.to(DEVICE))
        assert y.dtype == dtype
        assert rel_err(y, x.double() @ ref.T) < (4e-3 if dtype == torch.float16 else 2e-2)


@pytest.mark.parametrize("split,num_warps,x_perm,tile_r",
                         [(1, None, "kernel", None), (3, 4, "torch", None), (100, 1, "kernel", None),
                          (1, None, "kernel", 2), (3, 2, "kernel", 4), (5, 1, "torch", 1)])
def test_launch_overrides_agree(split, num_warps, x_perm, tile_r):
    """Split-K off (direct store), uneven splits, other warp counts, x gathered by torch, several
    tiles per program (groups of 4 row-groups, tiles of 1-4): same result."""
    w, ref = make_gptq(4, 264, 384, 32, act_order=True, seed=7)
    lin = linear(w)
    x = xs(2, 384).to(DEVICE)
    facts = lin._gptq_kernel
    y = G.gptq_gemv(x, lin.qweight, lin.gptq_zeros, lin.scales, lin.gptq_perm, 4, 32,
                    facts["block_r"], num_warps=num_warps, split=split, x_perm=x_perm, tile_r=tile_r)
    assert rel_err(y, x.double().cpu() @ ref.T) < 1e-5


def test_launch_params_fill_the_gpu_and_keep_x_in_registers():
    p = G.launch_params(4096, 4096, 4, 16, m=1)
    assert p["BLOCK_N"] == 128 * p["num_warps"] and p["BLOCK_R"] == G.GEMV_TILE_ROWS
    assert triton_cdiv(4096, p["BLOCK_N"]) * p["split"] >= 132 and p["split"] >= G.MIN_SPLIT
    assert G.launch_params(4096, 4096, 4, 16, m=1, block_r=16)["BLOCK_R"] == 16  # the override
    assert G.launch_params(4096, 4096, 4, 2, m=1)["BLOCK_R"] == 2  # never past the group's
    assert G.launch_params(256, 256, 4, 16, m=1)["split"] == 256 // 8 // G.GEMV_TILE_ROWS  # capped by tiles
    for m in (1, 2, 4, 8, 16):
        p = G.launch_params(4096, 4096, 4, 16, m=m)
        assert p["BLOCK_R"] * (1 << (m - 1).bit_length()) < 32 * p["num_warps"]
    p = G.launch_params(14336, 4096, 4, 16, m=1)
    assert p["split"] * p["rows_per_split"] >= 4096 // 8 > (p["split"] - 1) * p["rows_per_split"]
    # the half2 unpack: 16-row tiles at one activation row, 8 past it (whole-step A/Bs, gptq.py)
    assert [G.launch_params(4096, 4096, 4, 16, m=m, half2=True)["BLOCK_R"] for m in (1, 2, 3, 4)] == \
        [G.HALF2_TILE_ROWS] + [G.GEMV_TILE_ROWS] * 3


def triton_cdiv(a, b):
    return -(-a // b)


def test_prepare_sorts_act_order_in_place_and_the_torch_path_follows():
    """The codes are held once: prepare replaces qweight with its sorted-K copy (g_idx dropped, perm kept);
    QuantLinear's own dequantization (torch path, dequantized(), lookup) puts W's columns back."""
    w, ref = make_gptq(4, 64, 128, 32, act_order=True, seed=9)
    lin = QuantLinear(w).to(DEVICE)
    before = lin.qweight.clone()
    x = xs(3, 128).to(DEVICE)
    y_torch = lin(x)
    lin.kernel = kernels.kernel_for(lin)
    assert lin.gptq_perm.dtype == torch.int32 and lin.qweight.shape == before.shape
    assert lin.g_idx is None and not torch.equal(lin.qweight, before)
    assert not any(name.endswith("sorted") for name, _ in lin.named_buffers())
    torch.testing.assert_close(lin(x), y_torch, rtol=1e-5, atol=1e-5)
    for m in (1, 12):  # GEMV and prefill paths on the sorted codes
        xm = xs(m, 128, seed=m).to(DEVICE)
        torch.testing.assert_close(lin(xm).double().cpu(), xm.double().cpu() @ ref.t(), rtol=1e-4, atol=1e-4)
    saved = lin.kernel
    lin.kernel = None  # the torch path on the sorted buffers
    torch.testing.assert_close(lin(x), y_torch, rtol=1e-5, atol=1e-5)
    lin.kernel = saved
    torch.testing.assert_close(lin.dequantized(torch.float64).cpu(), ref, rtol=0, atol=0)
    assert kernels.kernel_for(lin) is G.gptq_matmul and lin._gptq_kernel["sorted"]  # prepared once


def test_uneven_groups_use_the_dequantize_path():
    w, ref = make_gptq(4, 64, 128, 32, uneven=True, seed=11)
    lin = linear(w)
    assert lin._gptq_kernel["block_r"] is None and not hasattr(lin, "gptq_zeros")
    x = xs(1, 128).to(DEVICE)
    assert rel_err(lin(x), x.double().cpu() @ ref.T) < 1e-5


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_and_sort_roundtrip(bits):
    w, ref = make_gptq(bits, 32, 128, 32, act_order=True, seed=bits)
    codes = G.unpack_codes(w.qweight, bits)
    assert torch.equal(G.pack_codes(codes, bits), w.qweight)
    qs, perm = G.sort_act_order(w.qweight, w.g_idx, bits, 32, band=8)
    assert torch.equal(G.unpack_codes(qs, bits), codes[perm.long()])
    assert torch.equal(w.g_idx[perm.long()].long(), torch.arange(128) // 32)
    sorted_w = GPTQWeight(qs, w.qzeros, w.scales, None, bits, 32, False, w.zero_offset)
    torch.testing.assert_close(dequantize_gptq(sorted_w, dtype=torch.float64), ref[:, perm.long()], rtol=0, atol=0)


def test_kernel_for_without_triton_keeps_the_torch_path(monkeypatch):
    w, _ = make_gptq(4, 32, 64, 32)
    lin = QuantLinear(w)
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    assert kernels.kernel_for(lin) is None


# ---------------------------------------------------------------- old GPUs

COMPILE_SCRIPT = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowgear.ops.matmul import gptq_gemv as G

# y as fp32: an fp16 output's store may convert the result's layout once, at the end (shared memory
# outside the loop), which would hide what the check below is after
GEMV = {"x_ptr": "*fp16", "qw_ptr": "*i32", "zf_ptr": "*fp16", "sc_ptr": "*fp16", "perm_ptr": "*i32",
        "y_ptr": "*fp32", "part_ptr": "*fp32", "cnt_ptr": "*i32", "N": "i32", "ROWS": "i32", "rows_per_split": "i32", "group_rows": "i32",
        "stride_xm": "i32"}
DEQ = {"qw_ptr": "*i32", "qz_ptr": "*i32", "sc_ptr": "*fp16", "gidx_ptr": "*i32", "out_ptr": "*fp16",
       "N": "i32", "K": "i32", "col0": "i32", "band": "i32", "group_size": "i32", "zero_offset": "i32"}

def gemv(bits, m, perm, half2=False):
    p = G.launch_params(4096, 4096, bits, G.gemv_tile_rows(bits, 128, 4096), m)
    return dict(M=m, M_PAD=triton.next_power_of_2(m), BITS=bits, BLOCK_R=p["BLOCK_R"], BLOCK_N=p["BLOCK_N"],
                HAS_PERM=perm, S_CHUNK=4, PDL=False, F16X2=half2), p["num_warps"]

CASES = [(f"gemv_b{b}_m{m}_perm{int(pm)}", G.gptq_gemv_kernel, GEMV, *gemv(b, m, pm), True)
         for b, m, pm in [(4, 1, False), (4, 4, True), (4, 16, False), (3, 1, True), (8, 2, False), (2, 1, False)]]
CASES += [(f"gemv_half2_m{m}", G.gptq_gemv_kernel, GEMV, *gemv(4, m, False, True), True) for m in (1, 4)]
CASES += [(f"dequant_b{b}", G.gptq_dequant_t_kernel, DEQ,
           dict(BITS=b, HAS_GIDX=b == 3, BLOCK_K=32, BLOCK_N=128), 4, False) for b in (3, 4)]
# zeros as one row for every group (ZROW: Q4_0, Q6_K, symmetric GPTQ), float zeros as Q6_K's are
_h2, _h2_warps = gemv(4, 1, False, True)
CASES += [("gemv_half2_m1_zrow", G.gptq_gemv_kernel, GEMV, {**_h2, "ZROW": True}, _h2_warps, True),
          ("dequant_b8_float_z_zrow", G.gptq_dequant_t_kernel, dict(DEQ, qz_ptr="*fp16"),
           dict(BITS=8, HAS_GIDX=False, BLOCK_K=32, BLOCK_N=128, FLOAT_Z=True, ZROW=True), 4, False)]
# tiles over several groups (SPAN: GGUF's groups of 16 and 32), as Q4_0 (one zero row), Q4_K (float zeros per group)
# and Q6_K (8-bit codes, float zeros in one row) take them
CASES += [("gemv_half2_m1_span_zrow", G.gptq_gemv_kernel, GEMV, {**_h2, "ZROW": True, "SPAN": 4}, _h2_warps, True),
          ("gemv_half2_m1_span_float_z", G.gptq_gemv_kernel, GEMV, {**_h2, "FLOAT_Z": True, "SPAN": 4}, _h2_warps, True),
          ("gemv_b8_m2_span_float_z_zrow", G.gptq_gemv_kernel, GEMV,
           {**gemv(8, 2, False)[0], "FLOAT_Z": True, "ZROW": True, "SPAN": 4}, gemv(8, 2, False)[1], True)]
# 6-bit codes (GGUF's 5/6-bit types on sm_80+: ops/matmul/repack.py), with Q6_K's float zeros as one row
_b6, _b6_warps = gemv(6, 1, False)
CASES += [("gemv_b6_m1_float_z_zrow", G.gptq_gemv_kernel, GEMV, {**_b6, "FLOAT_Z": True, "ZROW": True}, _b6_warps, True),
          ("dequant_b6_float_z_zrow", G.gptq_dequant_t_kernel, dict(DEQ, qz_ptr="*fp16"),
           dict(BITS=6, HAS_GIDX=False, BLOCK_K=32, BLOCK_N=128, FLOAT_Z=True, ZROW=True), 4, False)]

out = {}
for cap in (70, 75):
    for name, kernel, args, consts, warps, is_gemv in CASES:
        sig = {a: args.get(a, "constexpr") for a in kernel.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(kernel.arg_names)
                 if a in args and (args[a].startswith("*") or a in ("N", "ROWS", "stride_xm", "K"))}
        try:
            c = triton.compile(ASTSource(kernel, sig, constexprs=consts, attrs=attrs),
                               target=GPUTarget("cuda", cap, 32), options={"num_warps": warps})
            ptx = c.asm["ptx"]
            out[f"sm_{cap}/{name}"] = dict(ok=True, gemv=is_gemv, mma=len(re.findall(r"\b(?:wg)?mma\.", ptx)),
                                           shared=c.metadata.shared, cvt=len(re.findall(r"cvt\.rn\.f32\.[su]32", ptx)),
                                           v4=len(re.findall(r"ld\.global(?:\.nc)?\.v4", ptx)),
                                           f16x2=len(re.findall(r"fma\.rn\.f16x2", ptx)))
        except Exception as exc:
            out[f"sm_{cap}/{name}"] = dict(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
print("RESULTS" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled() -> dict:
    return compiled_results(COMPILE_SCRIPT, timeout=600)


def test_gptq_kernels_compile_for_volta_and_turing(compiled):
    failed = {name: r["error"] for name, r in compiled.items() if not r["ok"]}
    assert not failed, failed
    assert len(compiled) == 2 * 17


def test_gptq_gemv_stays_in_registers(compiled):
    """No tensor-core mma, no int->float cvt per code (the exponent trick), 16-byte weight loads, and
    no shared memory beyond the split-K counter's broadcast (a few bytes): a layout conversion in the
    code loop would show up as kilobytes of shared memory."""
    for name, r in compiled.items():
        if r["gemv"]:
            assert r["mma"] == 0 and r["shared"] <= 16 and r["v4"] > 0, (name, r)
            assert r["cvt"] <= 8, (name, r)
    # the packed-half2 form assembled (ptxas ran for sm_70 / sm_75): its f16x2 math is in the PTX
    for cap in (70, 75):
        assert compiled[f"sm_{cap}/gemv_half2_m1"]["f16x2"] > 0 and compiled[f"sm_{cap}/gemv_b4_m1_perm0"]["f16x2"] == 0


def test_no_tl_dot_in_gptq_source():
    assert not re.search(r"tl\.dot\(", open(G.__file__).read())
