"""ops/matmul/gptq_mma.py: the tl.dot batched-decode GPTQ kernel, and gptq_matmul's routing to it.

Numerics run in Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1; it executes
tl.dot), against W = (q - z) * s in float64 built from the random integers of
tests/test_quant_kernels_gptq.py's `make_gptq`, and against `dequantize_gptq` in float64. The routing
is checked with a simulated compute capability (CPU tensors have none); the kernel is compiled for
sm_80 / sm_90 targets with no GPU to check that tl.dot became tensor-core mma there (and for sm_75,
where Triton gives FMAs: why the routing stops at 8.0). The gpu test runs the Llama-3-8B shapes.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch
from helpers import compiled_results

pytest.importorskip("triton")

from test_quant_kernels_gptq import _interpreter_numpy_shim, make_gptq, rel_err, xs  # noqa: E402, F401

from lowgear.platform import hardware
from lowgear.model.linear import QuantLinear  # noqa: E402
from lowgear.ops import matmul as kernels
from lowgear.formats.gptq import GPTQWeight, dequantize_gptq  # noqa: E402
from lowgear.ops.matmul import gptq_gemv as G
from lowgear.ops.matmul import gptq_mma as MM  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
AMPERE, TURING = (8, 0), (7, 5)


def prepared(w: GPTQWeight, device=DEVICE) -> QuantLinear:
    lin = QuantLinear(w).to(device)
    assert kernels.kernel_for(lin) is G.gptq_matmul
    return lin


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """Records which path gptq_matmul takes ("gemv", "mma", "prefill") and still runs it."""
    seen: list[str] = []

    def spy(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            seen.append(name)
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(G, "gptq_gemv", spy("gemv", G.gptq_gemv))
    monkeypatch.setattr(G.gptq_mma, "gptq_mma", spy("mma", MM.gptq_mma))
    monkeypatch.setattr(G, "dequantize_t", spy("prefill", G.dequantize_t))
    return seen


# bits, N (never a multiple of BLOCK_N), K, group size: K spans an odd number of groups (the last
# one short where K is not a multiple of the group)
SHAPES = [(4, 200, 96, 32), (4, 200, 384, 128), (4, 200, 160, -1), (4, 72, 160, 64),
          (8, 200, 160, 32), (8, 72, 384, 128), (8, 40, 96, -1), (2, 80, 160, 32)]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,n,k,gs", SHAPES)
def test_mma_matches_float64(bits, n, k, gs, act_order, calls):
    w, ref = make_gptq(bits, n, k, gs, act_order, v2=bits == 8, seed=bits + k + n)
    torch.testing.assert_close(dequantize_gptq(w, dtype=torch.float64), ref, rtol=0, atol=0)
    lin = prepared(w)
    assert lin._gptq_kernel["mma_block_k"] is not None
    for m in (9, 16, 33, 64):
        x = xs(m, k, seed=m, dtype=torch.float16).to(DEVICE)
        calls.clear()
        y = G.gptq_matmul(x.reshape(1, m, k), lin, capability=AMPERE)
        assert calls == ["mma"] and y.shape == (1, m, n) and y.dtype == torch.float16
        # x is exact in fp16, so the only roundings are the fp32 sums and y's own fp16 rounding
        assert rel_err(y[0], x.double().cpu() @ ref.T) < 1e-3, m


@pytest.mark.gpu  # Triton 3.6's interpreter multiplies bf16 tl.dot operands as their raw bits (2.8e10 off)
def test_bf16_activations(calls):
    w, ref = make_gptq(4, 200, 384, 128, act_order=True, seed=4)
    lin = prepared(w)
    x = xs(20, 384, dtype=torch.bfloat16).to(DEVICE)
    y = G.gptq_matmul(x, lin, capability=(9, 0))
    assert calls == ["mma"] and y.dtype == torch.bfloat16
    assert rel_err(y, x.double().cpu() @ ref.T) < 8e-3


@pytest.mark.parametrize("split,block_n,num_warps", [(1, 16, 4), (2, 32, 2), (5, 64, 4), (100, 128, 8)])
def test_launch_overrides_agree(split, block_n, num_warps):
    """Split-K off (direct store), even and uneven splits, clamped splits, other tiles: same result."""
    w, ref = make_gptq(4, 200, 640, 32, act_order=True, seed=7)
    lin = prepared(w)
    x = xs(24, 640, dtype=torch.float16).to(DEVICE)
    y = MM.gptq_mma(x, lin.qweight, lin.gptq_zeros, lin.scales, lin.gptq_perm, 4, 32,
                    lin._gptq_kernel["mma_block_k"], split=split, block_n=block_n, num_warps=num_warps)
    assert rel_err(y, x.double().cpu() @ ref.T) < 1e-3


def test_block_k_and_launch_params():
    assert MM.mma_block_k(4, 128, 4096) == 128 and MM.mma_block_k(4, 32, 4096) == 32
    assert MM.mma_block_k(8, -1, 4096) == 128 and MM.mma_block_k(4, -1, 160) == 32
    assert MM.mma_block_k(3, 128, 4096) is None  # codes straddle words: GEMV / prefill only
    assert MM.mma_block_k(4, 8, 4096) is None  # a group under one tl.dot K step
    for n, k in [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]:
        for m in (9, 16, 64):
            p = MM.mma_launch_params(n, k, m, 4, 128)
            assert p["BLOCK_M"] == max(16, 1 << (m - 1).bit_length())
            assert p["split"] * p["k_per_split"] >= k > (p["split"] - 1) * p["k_per_split"]
            assert p["WORDS"] == (m <= MM.WORDS_MAX_M)
            if p["WORDS"]:  # split until about TARGET_PROGRAMS programs run (uncapped: docs/decisions/024)
                programs = -(-n // p["BLOCK_N"]) * p["split"]
                assert programs >= MM.TARGET_PROGRAMS // 2 or p["split"] == -(-k // 128), (n, k, m, p)
            # fp32 partials (written + read) stay within MAX_PARTIAL_FRACTION of the packed weight bytes
            elif p["split"] > 1:
                assert 8 * p["split"] * m * n <= MM.MAX_PARTIAL_FRACTION * n * k * 4 / 8
    assert MM.mma_launch_params(4096, 4096, 64, 4, 128)["split"] == 1


@pytest.mark.parametrize("capability", [None, (7, 0), TURING, AMPERE, (8, 9), (9, 0)])
@pytest.mark.parametrize("m", [1, G.MMA_FROM_M - 1, G.MMA_FROM_M, G.MAX_M, G.MAX_M + 1, 16, MM.MMA_MAX_M,
                               MM.MMA_MAX_M + 1])
def test_routing_by_rows_and_capability(m, capability, calls):
    """On sm_80+ the tl.dot kernel from MMA_FROM_M up to MMA_MAX_M rows and the GEMV below; elsewhere
    the GEMV up to MAX_M; past those dequantize + cuBLAS."""
    w, ref = make_gptq(4, 72, 160, 32, act_order=True, seed=5)
    lin = prepared(w)
    x = xs(m, 160, seed=m, dtype=torch.float16).to(DEVICE)
    y = G.gptq_matmul(x, lin, capability=capability)
    ampere = capability is not None and capability >= AMPERE
    if ampere and G.MMA_FROM_M <= m <= MM.MMA_MAX_M:
        want = "mma"
    elif m <= G.MAX_M:
        want = "gemv"
    else:
        want = "prefill"
    assert calls == [want]
    assert rel_err(y, x.double().cpu() @ ref.T) < 1e-3


def test_routing_keeps_other_layers_and_dtypes_off_the_kernel(calls):
    """fp32 activations, 3-bit codes and uneven act-order groups stay on dequantize + cuBLAS."""
    w4, ref4 = make_gptq(4, 72, 160, 32, act_order=True, seed=6)
    lin = prepared(w4)
    x = xs(16, 160).to(DEVICE)
    assert rel_err(G.gptq_matmul(x, lin, capability=AMPERE), x.double().cpu() @ ref4.T) < 1e-5
    assert calls == ["prefill"]
    for w, ref in (make_gptq(3, 64, 128, 32, seed=8), make_gptq(4, 64, 128, 32, uneven=True, seed=9)):
        calls.clear()
        lin = prepared(w)
        assert lin._gptq_kernel["mma_block_k"] is None
        x = xs(16, 128, dtype=torch.float16).to(DEVICE)
        assert rel_err(G.gptq_matmul(x, lin, capability=AMPERE), x.double().cpu() @ ref.T) < 1e-3
        assert calls == ["prefill"]


def test_module_hook_uses_the_device_capability(calls):
    """Through QuantLinear's hook (no capability passed) the module's device decides: none on the CPU."""
    w, ref = make_gptq(4, 72, 160, 32, seed=10)
    lin = prepared(w, "cpu")
    assert lin._gptq_kernel["capability"] is None and hardware.compute_capability(torch.device("cpu")) is None
    lin.kernel = G.gptq_matmul
    x = xs(16, 160, dtype=torch.float16)
    assert rel_err(lin(x), x.double() @ ref.T) < 1e-3
    assert calls == ["prefill"]
    lin._gptq_kernel["capability"] = AMPERE  # as prepare() records it for an sm_80 device
    calls.clear()
    assert rel_err(lin(x), x.double() @ ref.T) < 1e-3
    assert calls == ["mma"]


def test_no_tl_dot_outside_gptq_mma():
    """The dot lives only in gptq_mma.py, the file sm_70 / sm_75 never reach."""
    assert re.search(r"tl\.dot\(", Path(MM.__file__).read_text())
    assert not re.search(r"tl\.dot\(", Path(G.__file__).read_text())


# ---------------------------------------------------------------- compiled for real targets

COMPILE_SCRIPT = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowgear.ops.matmul import gptq_mma as MM

ARGS = {"x_ptr": "*fp16", "qw_ptr": "*i32", "zf_ptr": "*fp16", "sc_ptr": "*fp16", "perm_ptr": "*i32",
        "y_ptr": "*fp32", "part_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "k_per_split": "i32", "group_size": "i32",
        "stride_xm": "i32"}
DIVISIBLE = {"N", "K", "k_per_split", "group_size", "stride_xm"}

def case(cap, bits, m, perm, xdtype="fp16", n=4096, k=4096, zrow=False):
    p = MM.mma_launch_params(n, k, m, bits, MM.mma_block_k(bits, 128, k))
    args = dict(ARGS, x_ptr="*" + xdtype)
    kernel = MM.gptq_mma_kernel
    sig = {a: args.get(a, "constexpr") for a in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(kernel.arg_names)
             if a in args and (args[a].startswith("*") or a in DIVISIBLE)}
    consts = dict(BITS=bits, BLOCK_M=p["BLOCK_M"], BLOCK_N=p["BLOCK_N"], BLOCK_K=p["BLOCK_K"], HAS_PERM=perm,
                  S_CHUNK=4, PDL=False, FP16_MAGIC=xdtype == "fp16" or bits <= 4, WORDS=p["WORDS"], ZROW=zrow)
    c = triton.compile(ASTSource(kernel, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", cap, 32),
                       options={"num_warps": p["num_warps"], "num_stages": p["num_stages"]})
    ptx = c.asm["ptx"]
    return dict(cap=cap, bits=bits, m=m, perm=perm, dtype=xdtype, shared=c.metadata.shared, words=p["WORDS"],
                # the largest 16-bit float tile a register tensor stores to shared memory (the unpacked codes', where
                # they take that way to the mma operand layout; x's small tiles otherwise)
                f16_to_shared=max((int(a) * int(b) for a, b in re.findall(r"local_alloc %[^ ]+ : \(tensor<(\d+)x(\d+)x(?:b?f16)",
                                                                            c.asm["ttgir"])), default=0),
                mma=len(re.findall(r"\b(?:wg)?mma\.", ptx)), fma=len(re.findall(r"\bfma\.", ptx)),
                cvt_int=len(re.findall(r"cvt\.rn\.f(?:16|32)\.[su]32", ptx)),
                cvt_down=len(re.findall(r"cvt\.rn\.b?f16(?:x2)?\.f32", ptx)))

out = [case(80, 4, 16, False), case(80, 4, 64, True), case(80, 8, 33, False), case(80, 4, 16, True, "bf16"), case(80, 8, 9, False),
       case(90, 4, 16, False), case(90, 4, 64, False), case(75, 4, 16, False), case(90, 8, 16, False, zrow=True),
       case(90, 6, 16, False, zrow=True), case(90, 6, 64, False, zrow=True)]
print("RESULTS" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    return compiled_results(COMPILE_SCRIPT, timeout=600)


def test_mma_kernel_uses_tensor_cores_on_sm80_and_sm90(compiled):
    """tl.dot became (wg)mma; codes become floats without int->float cvt; shared memory fits an A100's
    164 KiB (and an RTX 30xx's 100 KiB) per block."""
    for r in compiled:
        if r["cap"] >= 80:
            assert r["mma"] > 0 and r["cvt_int"] == 0 and r["shared"] <= 96 * 1024, r
            # and straight into x's 16-bit float (no fp32 -> fp16 conversion per code: the fp32 form
            # of the exponent trick had 16-32 of them in these kernels)
            assert r["cvt_down"] == 0, r


def test_words_form_keeps_the_code_tile_out_of_shared_memory(compiled):
    """Up to WORDS_MAX_M rows the word tile goes to the mma operand layout as loaded (docs/decisions/024): no
    float tile of codes is stored to shared memory, only x's [16, 16] ones; the reshape form (more rows) stores
    its [BLOCK_K, BLOCK_N] codes there, which shows the check sees such a tile."""
    tensor_core = [r for r in compiled if r["cap"] >= 80]
    assert {r["words"] for r in tensor_core} == {True, False}
    for r in tensor_core:
        if r["words"]:
            assert r["f16_to_shared"] <= 16 * 32, r
        else:
            assert r["f16_to_shared"] >= 128 * 32, r


def test_mma_kernel_on_sm75_has_no_tensor_cores(compiled):
    """Why gptq_matmul routes only sm_80+ here: Triton 3.6 lowers this tl.dot to FMAs for sm_75."""
    r = next(r for r in compiled if r["cap"] == 75)
    assert r["mma"] == 0 and r["fma"] > 0, r


# ---------------------------------------------------------------- on a GPU

GPU_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # Llama-3-8B: qkvo / kv / gate-up / down


def random_layer(n: int, k: int, act_order: bool, bits: int = 4, gs: int = 128,
                 seed: int = 0) -> tuple[QuantLinear, torch.Tensor]:
    """A layer with its kernel hook, and W [n, k] float32 dequantized from the stored tensors before
    `prepare` sorted an act-order layer's codes in place."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    qweight = torch.randint(-(1 << 31), 1 << 31, (k * bits // 32, n), generator=g, device="cuda",
                            dtype=torch.int64).to(torch.int32)
    qzeros = torch.randint(-(1 << 31), 1 << 31, (k // gs, n * bits // 32), generator=g, device="cuda",
                           dtype=torch.int64).to(torch.int32)
    scales = (torch.rand((k // gs, n), generator=g, device="cuda") * 0.01 + 0.001).half()
    g_idx = None
    if act_order:
        g_idx = (torch.arange(k, device="cuda") // gs)[torch.randperm(k, generator=g, device="cuda")].to(torch.int32)
    stored = GPTQWeight(qweight, qzeros, scales, g_idx, bits, gs, False, 1)
    ref = dequantize_gptq(stored, dtype=torch.float32)
    lin = QuantLinear(stored)
    lin.kernel = kernels.kernel_for(lin)
    return lin, ref


@pytest.mark.gpu
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("n,k", GPU_SHAPES)
def test_gpu_8b_shapes_match_torch(n, k, act_order, calls):
    lin, w = random_layer(n, k, act_order)
    cap = torch.cuda.get_device_capability()
    assert lin._gptq_kernel["capability"] == cap
    for m in (16, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=torch.Generator("cuda").manual_seed(m))
        ref = x.float() @ w.t()
        calls.clear()
        y = lin(x)
        assert calls == (["mma"] if cap >= AMPERE else ["prefill"])
        y_kernel = MM.gptq_mma(x, lin.qweight, lin.gptq_zeros,
                               lin.scales, lin.gptq_perm if act_order else None, 4, 128,
                               lin._gptq_kernel["mma_block_k"])
        torch.cuda.synchronize()
        for out in (y, y_kernel):
            err = float((out.float() - ref).abs().max() / ref.abs().max())
            assert err < 2e-3, (n, k, m, err)
