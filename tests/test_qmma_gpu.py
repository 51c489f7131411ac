"""ops/matmul/qmma: the NVRTC-built mma.sync kernel, against W = (q - z) * s in float64.

On the GPU: odd row counts, N not a multiple of a block, groups of 16 / 32 / 128 / one group, float
(GGUF-like) zeros, forced K splits, the persistent grid, bf16, the sm_75 build (two m16n8k8 mmas, PTX the
driver JITs for the GPU at hand, as an emulated T4 runs), and a CUDA-graph replay. On the CPU: the kernel
compiles to sm_75 / sm_80 / sm_90 cubins (NVRTC runs ptxas, so the inline PTX is checked) and the launch
shapes hold their bounds.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from lowgear.ops import nvrtc
from lowgear.ops.matmul import qmma as Q
from lowgear.ops.matmul.gptq_gemv import float_zeros

from test_quant_kernels_gptq import pack_stream, rel_err  # noqa: E402

CUDA = torch.cuda.is_available()


@functools.lru_cache(maxsize=4)
def make(bits, n, k, gs, seed=0, float_z=False):
    """(qweight, zf, scales) on the GPU and W [n, k] float64 from random codes (gs -1: one group)."""
    rng = np.random.default_rng(seed)
    groups = 1 if gs == -1 else k // gs
    g = np.arange(k) // (k if groups == 1 else gs)
    q = rng.integers(0, 1 << bits, (k, n))
    if float_z:  # a K-quant's minimum over its scale: not an integer
        z = (rng.random((groups, n)) * (1 << bits)).astype(np.float16)
    else:
        z = rng.integers(0, 1 << bits, (groups, n)).astype(np.float16)
    s = (rng.random((groups, n)) * 0.02 + 0.002).astype(np.float16)
    w = ((q - z[g].astype(np.float64)) * s[g].astype(np.float64)).T
    qweight = torch.from_numpy(pack_stream(q, bits)).cuda()
    return qweight, torch.from_numpy(z).cuda(), torch.from_numpy(s).cuda(), torch.from_numpy(np.ascontiguousarray(w))


def check(y, x, w, tol=2e-3):
    err = rel_err(y, x.double().cpu() @ w.t())
    assert err < tol, err


CASES = [  # bits, m, n, k, group
    (4, 1, 256, 128, 32), (4, 3, 328, 96, 32), (4, 5, 4096, 4096, 128), (4, 8, 520, 4096, -1),
    (4, 9, 264, 160, 32), (4, 16, 6144, 4096, 128), (4, 13, 1032, 14336, 128), (4, 16, 28672, 1024, 128),
    (8, 1, 264, 64, 16), (8, 7, 512, 4096, 16), (8, 16, 1032, 1024, 32), (8, 11, 1032, 14336, 16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("bits,m,n,k,gs", CASES)
@pytest.mark.parametrize("split", [None, 1, 7], ids=["auto", "s1", "s7"])
@pytest.mark.parametrize("float_z", [False, True])
@pytest.mark.parametrize("use_async", [True, False])  # the cp.async ring (sm_80+), the register pipeline
def test_matches_float64(bits, m, n, k, gs, split, float_z, use_async):
    qw, z, s, w = make(bits, n, k, gs, seed=m + n, float_z=float_z)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    y = Q.qmma(x, qw, z, s, bits, gs, torch.cuda.get_device_capability(), split=split, use_async=use_async)
    check(y, x, w)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,m,n,k,gs", [(4, 5, 328, 96, 32), (4, 16, 6144, 4096, 128), (8, 7, 512, 4096, 16),
                                           (8, 40, 1032, 1024, 16)])
@pytest.mark.parametrize("use_async", [True, False])
def test_one_zero_row(bits, m, n, k, gs, use_async):
    """Zeros as one row [1, N] for every group (ZROW: Q4_0's 8, Q6_K's 32, symmetric GPTQ), fold and DQ builds."""
    rng = np.random.default_rng(m + n)
    q = rng.integers(0, 1 << bits, (k, n))
    z = rng.integers(0, 1 << bits, (1, n)).astype(np.float16)
    s = (rng.random((k // gs, n)) * 0.02 + 0.002).astype(np.float16)
    w = ((q - z.astype(np.float64)) * s[np.arange(k) // gs].astype(np.float64)).T
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    y = Q.qmma(x, torch.from_numpy(pack_stream(q, bits)).cuda(), torch.from_numpy(z).cuda(), torch.from_numpy(s).cuda(),
               bits, gs, torch.cuda.get_device_capability(), use_async=use_async)
    check(y, x, torch.from_numpy(np.ascontiguousarray(w)))


@pytest.mark.gpu
@pytest.mark.parametrize("bits,m,n,k,gs", [(4, 1, 256, 128, 32), (4, 9, 264, 160, 32), (4, 16, 6144, 4096, 128),
                                           (8, 7, 512, 4096, 16), (8, 16, 1032, 1024, 32)])
def test_sm75_build(bits, m, n, k, gs):
    """The build an sm_75 card runs (m16n8k8 pairs), JIT-compiled from its PTX for the GPU at hand."""
    qw, z, s, w = make(bits, n, k, gs, seed=3, float_z=True)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    check(Q.qmma(x, qw, z, s, bits, gs, (7, 5)), x, w)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,m,n,k,gs", CASES)
def test_split_major_sum(bits, m, n, k, gs):
    """The split-K sum split-major (the DQ build's, an option for 1-16 rows): the same answer."""
    qw, z, s, w = make(bits, n, k, gs, seed=m * n, float_z=True)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    check(Q.qmma(x, qw, z, s, bits, gs, torch.cuda.get_device_capability(), split=7, split_major=True), x, w)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,m,n,k,gs", CASES)
@pytest.mark.parametrize("grid_x", [None, 1, 3], ids=["auto", "g1", "g3"])
@pytest.mark.parametrize("split", [None, 1, 7], ids=["auto", "s1", "s7"])
def test_persistent_grid(bits, m, n, k, gs, grid_x, split):
    """The persistent grid (sm_80+): a block takes every grid_x-th column block of its K split, the last one
    short where N is not a multiple of 256 (grid_x 1: one block a split takes them all)."""
    qw, z, s, w = make(bits, n, k, gs, seed=m + 2 * n, float_z=True)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    cap = torch.cuda.get_device_capability()
    if cap < Q.ASYNC_FROM:
        pytest.skip("the persistent grid runs on the cp.async ring (sm_80+)")
    y = Q.qmma(x, qw, z, s, bits, gs, cap, split=split, persistent=True, grid_x=grid_x)
    check(y, x, w)
    # twice more (the counters put back to 0 by the last block of every column block), split-major sum too
    check(Q.qmma(x, qw, z, s, bits, gs, cap, split=split, persistent=True, grid_x=grid_x, split_major=True), x, w)


DQ_CASES = [  # 17-64 rows: the DQ build (codes made fp16 weights before the mma), 4 or 8 row tiles
    (4, 17, 264, 160, 32), (4, 32, 4096, 4096, 128), (4, 33, 520, 4096, -1), (4, 64, 6144, 4096, 32),
    (4, 47, 1032, 14336, 128), (8, 24, 512, 4096, 16), (8, 64, 1032, 1024, 32), (8, 57, 264, 64, 16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("bits,m,n,k,gs", DQ_CASES)
@pytest.mark.parametrize("split", [None, 5], ids=["auto", "s5"])
@pytest.mark.parametrize("use_async", [True, False])
def test_dq_matches_float64(bits, m, n, k, gs, split, use_async):
    """Weights rounded to fp16 before the mma: the same tolerance as the exact-code fold (2e-3 of the norm).
    Integer zeros (GPTQ) for odd M, float zeros (K-quants) for even."""
    qw, z, s, w = make(bits, n, k, gs, seed=m + n, float_z=m % 2 == 0)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    p = Q.launch_params(m, n, k, bits, 132)
    assert p["DQ"] == 1
    y = Q.qmma(x, qw, z, s, bits, gs, torch.cuda.get_device_capability(), split=split, use_async=use_async)
    check(y, x, w)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,m,n,k,gs", [(4, 40, 1032, 4096, 32), (8, 20, 512, 1024, 16)])
def test_dq_sm75_build(bits, m, n, k, gs):
    qw, z, s, w = make(bits, n, k, gs, seed=4, float_z=True)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    check(Q.qmma(x, qw, z, s, bits, gs, (7, 5)), x, w)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 6, 16])
def test_bf16(m):
    qw, z, s, w = make(4, 1032, 4096, 128, seed=5, float_z=True)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    check(Q.qmma(x, qw, z, s, 4, 128, torch.cuda.get_device_capability()), x, w, tol=3e-3)


@pytest.mark.gpu
def test_strided_rows_and_graph_replay():
    qw, z, s, w = make(4, 4096, 4096, 128, seed=7)
    big = torch.randn(12, 4096 + 64, device="cuda", dtype=torch.float16)
    x = big[:, 8:8 + 4096]  # rows 4160 halves apart, 16-byte aligned
    check(Q.qmma(x, qw, z, s, 4, 128, torch.cuda.get_device_capability()), x, w)
    static = torch.randn(12, 4096, device="cuda", dtype=torch.float16)
    Q.qmma(static, qw, z, s, 4, 128, torch.cuda.get_device_capability())  # compiled and counters made
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = Q.qmma(static, qw, z, s, 4, 128, torch.cuda.get_device_capability())
    for seed in range(3):
        static.copy_(torch.randn(12, 4096, device="cuda", dtype=torch.float16, generator=torch.Generator("cuda").manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        check(out, static, w)


@pytest.mark.gpu
def test_gptq_layer_zeros():
    """Through a GPTQ layer's own tensors (`float_zeros` of packed qzeros, v1's offset of 1)."""
    from test_quant_kernels_gptq import make_gptq

    gw, w = make_gptq(4, 512, 1024, 128)
    zf = float_zeros(gw.qzeros, 4, gw.zero_offset).cuda()
    x = torch.randn(16, 1024, device="cuda", dtype=torch.float16)
    check(Q.qmma(x, gw.qweight.cuda(), zf, gw.scales.cuda(), 4, 128, torch.cuda.get_device_capability()), x, w)


# ---------------------------------------------------------------- CPU


@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_86", "sm_90"])
@pytest.mark.parametrize("bits,mt,bf16", [(4, 1, 0), (4, 2, 0), (8, 1, 0), (8, 2, 0), (4, 2, 1), (4, 4, 0), (4, 8, 0),
                                         (8, 8, 0)])
def test_compiles(arch, bits, mt, bf16):
    if bf16 and arch == "sm_75":
        pytest.skip("bf16 mma needs sm_80 (serves() never asks for it)")
    if nvrtc.available() is not None:
        pytest.fail(nvrtc.available())
    for use_async in (0, 1):  # sm_75 compiles the register pipeline either way
        cubin = nvrtc.compile_source(Q.source(), {"BITS": bits, "MT": mt, "BF16": bf16, "WARPS": Q.WARPS,
                                                  "STAGES": Q.STAGES, "ASYNC": use_async, "PDL": 1,
                                                  "DQ": int(mt > 2)}, arch)
        assert cubin[:4] == b"\x7fELF"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_persistent_grid_compiles(arch):
    if nvrtc.available() is not None:
        pytest.fail(nvrtc.available())
    for bits, mt in ((4, 1), (4, 2), (8, 2), (4, 8)):
        cubin = nvrtc.compile_source(Q.source(), {"BITS": bits, "MT": mt, "DQ": int(mt > 2), "ASYNC": 1, "PDL": 1,
                                                  "PERSIST": 1}, arch)
        assert cubin[:4] == b"\x7fELF"


def test_persistent_grid_needs_the_ring():
    """Without the cp.async ring (sm_75's register pipeline) PERSIST is ignored: the same PTX as without it."""
    if nvrtc.available() is not None:
        pytest.fail(nvrtc.available())
    d = {"BITS": 4, "MT": 2, "ASYNC": 0}
    assert (nvrtc.compile_source(Q.source(), {**d, "PERSIST": 1}, "compute_75")
            == nvrtc.compile_source(Q.source(), {**d, "PERSIST": 0}, "compute_75"))
    ring = {"BITS": 4, "MT": 2, "ASYNC": 1}
    assert (nvrtc.compile_source(Q.source(), {**ring, "PERSIST": 1}, "compute_90")
            != nvrtc.compile_source(Q.source(), {**ring, "PERSIST": 0}, "compute_90"))


def test_persistent_launch_params():
    """gate|up at 16 rows on 132 SMs: x's 24 KB slice needs 7 splits of 608 features (16 x 608 halves + 19 chunk
    sums a row = 20,672 bytes; 6 splits of 704 would be 24,960), 112 column blocks; the persistent grid gives
    each split 3 x 132 // 7 = 56 blocks of two column blocks each (392 blocks in one wave, not 784 in two)."""
    p = Q.launch_params(16, 28672, 4096, 4, 132, persistent=True)
    assert (p["split"], p["k_per_split"], p["n_blocks"], p["PERSIST"], p["grid_x"]) == (7, 608, 112, 1, 56)
    assert Q.launch_params(16, 28672, 4096, 4, 132)["grid_x"] == 112  # off by default: a block a column block
    assert Q.launch_params(16, 4096, 4096, 4, 132, persistent=True)["grid_x"] == 16  # fewer column blocks than that
    t4 = Q.launch_params(16, 28672, 4096, 4, 40, persistent=True, capability=(7, 5))
    assert t4["PERSIST"] == 0 and t4["grid_x"] == t4["n_blocks"]  # no ring below sm_80


@pytest.mark.parametrize("arch", ["sm_75", "sm_90"])
def test_one_zero_row_compiles_and_leaves_other_builds_alone(arch):
    """ZROW (zeros one row [1, N] for every group) builds for the fold, DQ and persistent forms, and changes the
    PTX; at 0 the PTX is the build's without the define (qmma only defines it for such a layer)."""
    if nvrtc.available() is not None:
        pytest.fail(nvrtc.available())
    for d in ({"BITS": 4, "MT": 2, "ASYNC": 1}, {"BITS": 8, "MT": 8, "DQ": 1, "ASYNC": 1},
              {"BITS": 4, "MT": 2, "ASYNC": 1, "PERSIST": 1}, {"BITS": 4, "MT": 1, "ASYNC": 0}):
        assert nvrtc.compile_source(Q.source(), {**d, "ZROW": 1}, arch)[:4] == b"\x7fELF"
        target = "compute_" + arch[3:]
        plain = nvrtc.compile_source(Q.source(), d, target)
        assert nvrtc.compile_source(Q.source(), {**d, "ZROW": 0}, target) == plain
        assert nvrtc.compile_source(Q.source(), {**d, "ZROW": 1}, target) != plain


@pytest.mark.parametrize("arch", ["sm_75", "sm_90"])
def test_split_major_sum_compiles(arch):
    for bits, mt in ((4, 1), (4, 2), (8, 2)):
        cubin = nvrtc.compile_source(Q.source(), {"BITS": bits, "MT": mt, "ASYNC": 1, "SPLITMAJ": 1}, arch)
        assert cubin[:4] == b"\x7fELF"


def test_async_ring_only_from_sm80():
    ptx = nvrtc.compile_source(Q.source(), {"BITS": 4, "MT": 1, "ASYNC": 1}, "compute_80").decode()
    assert "cp.async.cg.shared.global" in ptx
    ptx = nvrtc.compile_source(Q.source(), {"BITS": 4, "MT": 1, "ASYNC": 1}, "compute_75").decode()
    assert "cp.async" not in ptx and "ld.global.nc.v4.u32" in ptx


def test_sm75_build_uses_m16n8k8():
    ptx = nvrtc.compile_source(Q.source(), {"BITS": 4, "MT": 1}, "compute_75").decode()
    assert "m16n8k8" in ptx and "m16n8k16" not in ptx
    ptx = nvrtc.compile_source(Q.source(), {"BITS": 4, "MT": 1}, "compute_80").decode()
    assert "m16n8k16" in ptx and "m16n8k8" not in ptx


@pytest.mark.parametrize("m,n,k,bits", [(1, 4096, 4096, 4), (16, 6144, 4096, 4), (16, 128256, 4096, 8),
                                        (9, 4096, 14336, 4), (3, 264, 96, 4)])
def test_launch_params(m, n, k, bits):
    p = Q.launch_params(m, n, k, bits, 132)
    assert p["smem"] <= Q.SMEM_BYTES + p["WARPS"] * Q.RING * 2048
    assert Q.launch_params(m, n, k, bits, 40, capability=(7, 5))["smem"] <= Q.SMEM_BYTES  # a T4 holds it
    assert p["k_per_split"] % Q.chunk(bits) == 0
    assert (p["split"] - 1) * p["k_per_split"] < k <= p["split"] * p["k_per_split"]  # no empty split
    assert p["n_blocks"] * 64 * p["WARPS"] >= n
    assert p["MT"] == (1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8)
    assert p["DQ"] == (m > 16)


@pytest.mark.parametrize("m,n,k,bits", [(64, 28672, 4096, 4), (17, 4096, 14336, 4), (40, 6144, 4096, 8)])
def test_dq_launch_params(m, n, k, bits):
    """17-64 rows: x's slice takes what an H100 lends a block beyond the ring, and stays inside it."""
    h100 = 227 * 1024
    p = Q.launch_params(m, n, k, bits, 132, smem_optin=h100)
    assert p["DQ"] == 1 and p["smem"] <= h100
    assert (p["split"] - 1) * p["k_per_split"] < k <= p["split"] * p["k_per_split"]
    small = Q.launch_params(m, n, k, bits, 132)  # no opt-in known: 48 KB of x, more splits
    assert small["split"] >= p["split"]
    t4 = Q.launch_params(m, n, k, bits, 40, smem_optin=64 * 1024, capability=(7, 5))
    assert t4["ASYNC"] == 0 and t4["smem"] <= Q.SMEM_BYTES


@pytest.mark.parametrize("args,ok", [
    ((16, 4096, 4096, 4, 128, torch.float16, (7, 5), False), True),
    ((65, 4096, 4096, 4, 128, torch.float16, (9, 0), False), False),  # past MAX_M
    ((64, 4096, 4096, 4, 128, torch.float16, (7, 5), False), True),  # the DQ build
    ((17, 4096, 4096, 4, 128, torch.bfloat16, (9, 0), False), False),  # DQ makes fp16 weights
    ((4, 4096, 4096, 4, 128, torch.float16, (7, 0), False), False),  # V100: no m16n8k8
    ((4, 4096, 4096, 3, 128, torch.float16, (9, 0), False), False),  # 3-bit codes straddle words
    ((4, 4096, 4096, 4, 128, torch.float16, (9, 0), True), False),  # act-order
    ((4, 4096, 4096, 4, 128, torch.bfloat16, (7, 5), False), False),  # no bf16 mma on sm_75
    ((4, 4096, 4096, 4, 128, torch.bfloat16, (8, 0), False), True),
    ((4, 4096, 4096, 8, 128, torch.bfloat16, (9, 0), False), False),  # 8-bit codes are not exact in bf16 + 128
    ((4, 4100, 4096, 4, 128, torch.float16, (9, 0), False), False),  # N % 8
    ((4, 4096, 4096, 4, 16, torch.float16, (9, 0), False), False),  # groups under a 32-feature chunk
    ((4, 4096, 4096, 8, 16, torch.float16, (9, 0), False), True),  # 8 bits: 16-feature chunks
    ((4, 4096, 4096, 4, 128, torch.float32, (9, 0), False), False),
])
def test_serves(args, ok):
    assert Q.serves(*args) is ok


def test_an_nvrtc_api_error_is_a_build_error():
    """Any failed NVRTC call (not only a compile error) raises BuildError, which gptq_matmul turns into the
    Triton fallback (a plain RuntimeError would reach the user)."""

    class Lib:  # NVRTC's error-string lookup, as ctypes would call it
        class nvrtcGetErrorString:
            restype = None

            def __new__(cls, rc):
                return b"NVRTC_ERROR_OUT_OF_MEMORY"

    nvrtc._check(Lib, 0)
    with pytest.raises(nvrtc.BuildError, match="NVRTC error 1: NVRTC_ERROR_OUT_OF_MEMORY"):
        nvrtc._check(Lib, 1)


def test_build_target_is_a_cubin_unless_emulating():
    assert nvrtc.target((9, 0), (9, 0)) == "sm_90"  # loads on a driver older than NVRTC
    assert nvrtc.target((7, 5), (7, 5)) == "sm_75"
    assert nvrtc.target((7, 5), (9, 0)) == "compute_75"  # LOWGEAR_EMULATE_SM=75: PTX the driver JITs


def test_a_failed_build_falls_back_to_the_triton_kernels(monkeypatch):
    """A BuildError (say, a driver too old for NVRTC's PTX) turns the kernel off with one warning, and the
    call still answers through the GEMV (run here by Triton's interpreter)."""
    from test_quant_kernels_gptq import linear, make_gptq

    from lowgear.ops.matmul import gptq_gemv as G

    gw, w = make_gptq(4, 64, 128, 32)
    lin = linear(gw)
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise nvrtc.BuildError("CUDA driver error in cuModuleLoadData: the provided PTX was compiled with an "
                               "unsupported toolchain")

    monkeypatch.setattr(Q, "_DISABLED", [])
    monkeypatch.setattr(Q, "qmma", broken)
    monkeypatch.setattr(G, "uses_qmma", lambda *a: Q.usable())
    monkeypatch.setattr(Q, "_nvrtc_missing", lambda: None)
    x = torch.randn(4, 128, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="mma.sync decode kernel is off"):
        y = G.gptq_matmul(x, lin)
    ref = x.double() @ w.t()
    assert rel_err(y, ref) < 1e-4
    assert calls == [1] and not Q.usable()
    G.gptq_matmul(x, lin)  # no second try, no second warning
    assert calls == [1]


def test_launch_structs_have_the_driver_abi_sizes():
    """cuLaunchKernelEx's CUlaunchConfig (56 bytes on 64-bit) and CUlaunchAttribute (an id, padding and a
    64-byte value union: 72 bytes), as cuda.h lays them out."""
    import ctypes

    assert ctypes.sizeof(nvrtc._LaunchAttribute) == 72
    assert ctypes.sizeof(nvrtc._LaunchConfig) == 56
    assert nvrtc._LaunchConfig.hStream.offset == 32 and nvrtc._LaunchConfig.numAttrs.offset == 48
