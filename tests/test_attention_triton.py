"""The triton rung's kernels and backend against the float64 reference, in Triton's interpreter.

conftest sets TRITON_INTERPRET=1 on machines without CUDA; the kernels are loaded through
`kernels.load`, which defines them for the interpreter whatever was imported before. Shapes are
small (page size 16, a few pages) because the interpreter runs every program in NumPy.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from lowgear.ops.kv_write import write_kv  # noqa: E402
from lowgear.attention.eager import EagerBackend, reference_attention  # noqa: E402
from lowgear.attention.metadata import build_metadata  # noqa: E402
from lowgear.attention.triton import TritonBackend, dtypes_for  # noqa: E402
from lowgear.platform.hardware import DeviceInfo, cpu_device  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tests run Triton in its interpreter (TRITON_INTERPRET=1)"
)

# fp32: the kernels accumulate in fp32 and use IEEE dot products, so only summation order differs.
FP32_TOL = 2e-5
# fp16: the reference sees the same fp16 inputs (upcast), so what remains is the fp16 rounding of
# the output (|out| <= ~3 -> half an ulp ~1e-3) and, in prefill, the probabilities rounded to fp16
# before the P.V dot (relative 2^-11 each, averaging out over a row). The interpreter computes the
# fp16 dot in NumPy with an fp32 result, as the GPU does with fp32 accumulation.
FP16_TOL = 4e-3


def kernels():
    from lowgear.ops.attention import load

    return load(interpret=True)


def paged_problem(q_lens, kv_lens, *, kv_heads=2, group=1, head_dim=64, page_size=16, dtype=torch.float32, seed=0):
    """Random caches with each sequence's pages scattered over the pool, queries and the step's metadata."""
    gen = torch.Generator().manual_seed(seed)
    counts = [(kv + page_size - 1) // page_size for kv in kv_lens]
    pool = sum(counts) + 3  # a few pages nobody owns
    order = torch.randperm(pool, generator=gen).tolist()
    tables, i = [], 0
    for n in counts:
        tables.append(order[i : i + n])
        i += n
    k_cache = torch.randn(pool, page_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(pool, page_size, kv_heads, head_dim, generator=gen).to(dtype)
    meta = build_metadata(list(q_lens), list(kv_lens), tables, page_size)
    q = torch.randn(meta.num_tokens, kv_heads * group, head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, meta


def assert_close(out, ref, tol):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


# -- decode kernel ------------------------------------------------------------------------------

# kv lengths around page boundaries (16): k*16 and k*16 +- 1, plus 1 and odd lengths.
BOUNDARY_KV = [1, 15, 16, 17, 31, 32, 33, 47, 49]


@pytest.mark.parametrize("group,head_dim", [(1, 64), (3, 64), (8, 128)])
def test_decode_matches_reference(group, head_dim):
    q, kc, vc, meta = paged_problem([1] * len(BOUNDARY_KV), BOUNDARY_KV, group=group, head_dim=head_dim)
    decode, _ = kernels()
    ref = reference_attention(q, kc, vc, meta, head_dim**-0.5)
    out = decode.paged_decode(q, kc, vc, meta.block_tables, meta.kv_lens, head_dim**-0.5, meta.max_kv_len, num_splits=1)
    assert_close(out, ref, FP32_TOL)


@pytest.mark.parametrize("num_splits", [2, 3, 7])
def test_decode_splits_agree(num_splits):
    """Split-K: uneven splits, and splits that lie wholly past a short sequence's end (empty)."""
    kv_lens = [1, 16, 70, 95]
    q, kc, vc, meta = paged_problem([1] * 4, kv_lens, group=2)
    decode, _ = kernels()
    ref = reference_attention(q, kc, vc, meta, 0.125)
    out = decode.paged_decode(q, kc, vc, meta.block_tables, meta.kv_lens, 0.125, meta.max_kv_len, num_splits=num_splits)
    assert_close(out, ref, FP32_TOL)


@pytest.mark.parametrize("window,num_splits", [(1, 1), (5, 1), (16, 2), (20, 3), (200, 2)])
def test_decode_sliding_window(window, num_splits):
    kv_lens = [3, 17, 48, 81]
    q, kc, vc, meta = paged_problem([1] * 4, kv_lens, group=3)
    decode, _ = kernels()
    ref = reference_attention(q, kc, vc, meta, 0.125, window)
    out = decode.paged_decode(
        q, kc, vc, meta.block_tables, meta.kv_lens, 0.125, meta.max_kv_len, window=window, num_splits=num_splits
    )
    assert_close(out, ref, FP32_TOL)
    if window < 48:  # the window changes the answer, so the test would catch it being ignored
        assert (reference_attention(q, kc, vc, meta, 0.125) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("heads_per_program", [1, 2, 4])
def test_decode_heads_per_program(heads_per_program):
    """A kv head's query heads served by one program or cut over several: same answer."""
    kv_lens = [1, 16, 70, 95]
    q, kc, vc, meta = paged_problem([1] * 4, kv_lens, group=4)
    decode, _ = kernels()
    ref = reference_attention(q, kc, vc, meta, 0.125)
    for splits in (1, 3):
        out = decode.paged_decode(q, kc, vc, meta.block_tables, meta.kv_lens, 0.125, meta.max_kv_len,
                                  num_splits=splits, heads_per_program=heads_per_program)
        assert_close(out, ref, FP32_TOL)


@pytest.mark.parametrize("min_split", [16, 32, 256])
def test_decode_bound_far_above_lengths(min_split):
    """A CUDA graph's launch: a kv bound far past every real length and many splits; each sequence
    spreads its own length over the splits (at least min_split each) and the rest stay empty."""
    kv_lens = [1, 17, 40, 95]
    q, kc, vc, meta = paged_problem([1] * 4, kv_lens, group=2)
    decode, _ = kernels()
    for window, block_n in ((None, 16), (20, 16), (None, 32)):  # 32: blocks span two 16-position pages
        ref = reference_attention(q, kc, vc, meta, 0.125, window)
        out = decode.paged_decode(q, kc, vc, meta.block_tables, meta.kv_lens, 0.125, 100_000, window=window,
                                  num_splits=8, min_split=min_split, block_n=block_n)
        assert_close(out, ref, FP32_TOL)


def test_decode_fp16():
    q, kc, vc, meta = paged_problem([1] * 5, [1, 16, 17, 40, 63], group=4, dtype=torch.float16)
    decode, _ = kernels()
    ref = reference_attention(q, kc, vc, meta, 0.125)
    for splits in (1, 3):
        out = decode.paged_decode(q, kc, vc, meta.block_tables, meta.kv_lens, 0.125, meta.max_kv_len, num_splits=splits)
        assert out.dtype == torch.float16
        assert_close(out, ref, FP16_TOL)


@pytest.mark.parametrize("group,head_dim,window", [(4, 64, None), (3, 64, 20), (8, 128, None), (1, 64, None)])
def test_decode_dot_form_fp16(group, head_dim, window):
    """The tl.dot form (what sm_80+ GPUs run for fp16 / bf16): GQA groups padded to 16 rows, blocks
    of 64 positions over 16-position pages, odd and page-boundary lengths, unequal batches, splits,
    a graph-style bound far past the lengths, and a window."""
    kv_lens = [1, 15, 16, 17, 33, 70, 95]
    q, kc, vc, meta = paged_problem([1] * len(kv_lens), kv_lens, group=group, head_dim=head_dim, dtype=torch.float16)
    decode, _ = kernels()
    ref = reference_attention(q, kc, vc, meta, head_dim**-0.5, window)
    for splits, bound in ((1, meta.max_kv_len), (3, meta.max_kv_len), (8, 100_000)):
        out = decode.paged_decode(q, kc, vc, meta.block_tables, meta.kv_lens, head_dim**-0.5, bound, window=window,
                                  num_splits=splits, use_dot=True)
        assert out.dtype == torch.float16
        assert_close(out, ref, FP16_TOL)


# (group, head_dim, dtype, window, split_d): GQA groups of 1-8 (3 pads to 4 rows), head_dim 80 pads
# to 128 (the masked lanes), fp16 and fp32 caches (fp32 loads 4 elements a thread, fp16 8), lanes
# across head_dim from 2 to 8.
SPLIT_D_CASES = [
    (1, 64, torch.float32, None, 4),
    (3, 64, torch.float32, 20, 8),
    (8, 128, torch.float32, None, 4),
    (2, 80, torch.float32, None, 4),
    (4, 128, torch.float16, None, 4),
    (4, 128, torch.float16, 5, 8),
    (4, 64, torch.float16, None, 2),
]


@pytest.mark.parametrize("group,head_dim,dtype,window,split_d", SPLIT_D_CASES)
def test_decode_split_d_form(group, head_dim, dtype, window, split_d):
    """The split-D FMA form (paged_decode's split_d) against the reference and against the whole-warp
    FMA form, which it must equal but for fp32 summation order: odd and page-boundary lengths,
    unequal batches, direct and split launches, a graph-style bound far past the lengths; blocks of
    16 positions (at most two 16-position pages: the two scalar table reads; a window starts blocks
    mid-page, so they straddle two) and of 32 (a table read per position)."""
    kv_lens = [1, 15, 16, 17, 31, 32, 33, 47, 49, 70, 95]
    q, kc, vc, meta = paged_problem([1] * len(kv_lens), kv_lens, group=group, head_dim=head_dim, dtype=dtype)
    decode, _ = kernels()
    scale = head_dim**-0.5
    ref = reference_attention(q, kc, vc, meta, scale, window)
    for splits, bound, block_n in ((1, meta.max_kv_len, 16), (3, meta.max_kv_len, 32), (8, 100_000, 16)):
        args = (q, kc, vc, meta.block_tables, meta.kv_lens, scale, bound)
        kw = {"window": window, "num_splits": splits, "block_n": block_n}
        out = decode.paged_decode(*args, **kw, split_d=split_d)
        assert out.dtype == dtype
        assert_close(out, ref, FP16_TOL if dtype == torch.float16 else FP32_TOL)
        whole_warp = decode.paged_decode(*args, **kw, split_d=0)
        # fp32: summation order only; fp16: at most one rounding step of the fp16 output apart
        limit = 1e-6 if dtype == torch.float32 else 2.0**-10 * whole_warp.abs().max().item()
        assert (out.double() - whole_warp.double()).abs().max().item() <= limit


def test_decode_split_d_clamps_to_head_dim():
    """split_d wider than head_dim allows (16 lanes of 8 fp16 over head_dim 64) takes 8 lanes."""
    q, kc, vc, meta = paged_problem([1, 1], [17, 40], group=2, head_dim=64, dtype=torch.float16)
    decode, _ = kernels()
    ref = reference_attention(q, kc, vc, meta, 0.125)
    out = decode.paged_decode(q, kc, vc, meta.block_tables, meta.kv_lens, 0.125, meta.max_kv_len, split_d=16)
    assert_close(out, ref, FP16_TOL)


@pytest.mark.parametrize("cc,dot", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_backend_takes_the_dot_form_only_from_sm80(cc, dot, monkeypatch):
    """Below sm_80 Triton lowers tl.dot to FMAs, so only sm_80+ decode takes the dot form."""
    import lowgear.attention.triton as T
    from lowgear.attention.base import ProbeResult

    from lowgear.ops.dispatch import Eligibility

    monkeypatch.setattr(T, "_interpret", lambda: False)
    monkeypatch.setattr(T, "triton_eligibility", lambda device: Eligibility(True, "ok", True))
    backend = TritonBackend()
    monkeypatch.setattr(backend, "_timed_probe", lambda device, dtype, time_limit: ProbeResult(True, "ok"))
    gpu = DeviceInfo(index=0, kind="cuda", name="Test GPU", compute_capability=cc, total_memory=16 * 2**30,
                     torch_arch_list=("sm_70", "sm_75", "sm_80", "sm_90"))
    assert backend.probe(gpu).available
    assert (0 in backend._dot_devices) is dot


def test_decode_choose_splits():
    decode, _ = kernels()
    # the DOT form aims at fewer programs for one sequence (fewer partials for the reduce)
    assert decode.dot_programs_per_sm(1) < decode.dot_programs_per_sm(2) == decode.dot_programs_per_sm(64)
    assert decode.choose_splits(batch=64, kv_heads=8, max_kv_len=4096, block_n=16, target_programs=512) == 1
    assert decode.choose_splits(batch=1, kv_heads=8, max_kv_len=4096, block_n=16, target_programs=512, min_split=256) == 16
    assert decode.choose_splits(batch=1, kv_heads=8, max_kv_len=4096, block_n=16, target_programs=512) == 64
    assert decode.choose_splits(batch=1, kv_heads=8, max_kv_len=300, block_n=16, target_programs=512, min_split=256) == 2
    assert decode.choose_splits(batch=1, kv_heads=8, max_kv_len=300, block_n=16, target_programs=512, min_split=16) == 19
    assert decode.choose_splits(batch=1, kv_heads=1, max_kv_len=10**6, block_n=16, target_programs=10**4) == 64


# -- prefill kernel -----------------------------------------------------------------------------


@pytest.mark.parametrize("group,head_dim", [(1, 64), (3, 64), (8, 128)])
def test_prefill_matches_reference(group, head_dim):
    """Unequal chunks over cached prefixes: whole prompts, chunks ending at page edges, odd lengths."""
    q_lens = [1, 7, 16, 33]
    kv_lens = [1, 23, 32, 49]  # prefixes of 0, 16, 16 and 16 cached positions
    q, kc, vc, meta = paged_problem(q_lens, kv_lens, kv_heads=1 if group == 8 else 2, group=group, head_dim=head_dim)
    _, prefill = kernels()
    ref = reference_attention(q, kc, vc, meta, head_dim**-0.5)
    out = prefill.paged_prefill(
        q, kc, vc, meta.block_tables, meta.cu_q_lens, meta.kv_lens, head_dim**-0.5, meta.max_q_len
    )
    assert_close(out, ref, FP32_TOL)


@pytest.mark.parametrize("window", [1, 7, 16, 40])
def test_prefill_sliding_window(window):
    q_lens, kv_lens = [9, 40, 2], [9, 57, 35]
    q, kc, vc, meta = paged_problem(q_lens, kv_lens, group=2)
    _, prefill = kernels()
    ref = reference_attention(q, kc, vc, meta, 0.125, window)
    out = prefill.paged_prefill(
        q, kc, vc, meta.block_tables, meta.cu_q_lens, meta.kv_lens, 0.125, meta.max_q_len, window=window
    )
    assert_close(out, ref, FP32_TOL)


# Gemma: soft-capped scores (gemma2's cap is 50; 1.5 bends these random scores, |s| up to ~4), head_dim
# 256 (the prefill kernel's 32x16 tiles), a sliding window, several splits and the fp16 tl.dot form.
GEMMA_CASES = [(1.5, 64, None, 1, torch.float32, False), (1.5, 256, None, 3, torch.float32, False),
               (1.5, 256, 20, 2, torch.float32, False), (None, 256, None, 2, torch.float32, False),
               (1.5, 256, 20, 2, torch.float16, True)]


@pytest.mark.parametrize("softcap,head_dim,window,num_splits,dtype,dot", GEMMA_CASES)
def test_decode_softcap_and_head_dim_256(softcap, head_dim, window, num_splits, dtype, dot):
    kv_lens = [3, 17, 48]
    q, kc, vc, meta = paged_problem([1] * 3, kv_lens, group=2, head_dim=head_dim, dtype=dtype)
    q = q * 4  # scores well past the cap
    decode, _ = kernels()
    ref = reference_attention(q, kc, vc, meta, 0.125, window, softcap)
    out = decode.paged_decode(q, kc, vc, meta.block_tables, meta.kv_lens, 0.125, meta.max_kv_len, window=window,
                              softcap=softcap, num_splits=num_splits, use_dot=dot)
    assert_close(out, ref, FP16_TOL if dtype == torch.float16 else FP32_TOL)
    if softcap:  # the cap changes the answer, so the test would catch it being ignored
        assert (reference_attention(q, kc, vc, meta, 0.125, window) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("softcap,head_dim,window", [(1.5, 64, None), (1.5, 256, None), (2.0, 256, 7), (None, 256, 7)])
def test_prefill_softcap_and_head_dim_256(softcap, head_dim, window):
    q_lens, kv_lens = [9, 20, 2], [9, 37, 35]
    q, kc, vc, meta = paged_problem(q_lens, kv_lens, group=2, head_dim=head_dim)
    q = q * 4
    _, prefill = kernels()
    ref = reference_attention(q, kc, vc, meta, 0.125, window, softcap)
    out = prefill.paged_prefill(q, kc, vc, meta.block_tables, meta.cu_q_lens, meta.kv_lens, 0.125, meta.max_q_len,
                                window=window, softcap=softcap)
    assert_close(out, ref, FP32_TOL)
    if softcap:
        assert (reference_attention(q, kc, vc, meta, 0.125, window) - ref).abs().max() > 1e-2


def test_eager_softcap_is_cap_tanh_of_the_scaled_score():
    """Hand-checked: one query, two keys; scores 0.5 * (4, 0) soft-capped at 1 are tanh(2) and 0."""
    import math

    from lowgear.attention.eager import attend_one

    q = torch.tensor([[[4.0, 0.0]]], dtype=torch.float64)
    k = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    v = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    p0 = 1 / (1 + math.exp(-math.tanh(2.0)))  # softmax over (tanh(2), 0)
    want = torch.tensor([[[p0, 1 - p0]]], dtype=torch.float64)
    torch.testing.assert_close(attend_one(q, k, v, 0.5, None, softcap=1.0), want)


def test_prefill_fp16():
    q, kc, vc, meta = paged_problem([5, 33], [21, 33], group=4, dtype=torch.float16)
    _, prefill = kernels()
    ref = reference_attention(q, kc, vc, meta, 0.125)
    out = prefill.paged_prefill(q, kc, vc, meta.block_tables, meta.cu_q_lens, meta.kv_lens, 0.125, meta.max_q_len)
    assert out.dtype == torch.float16
    assert_close(out, ref, FP16_TOL)


# -- backend ------------------------------------------------------------------------------------


def test_backend_attend_mixed_batch():
    """Prefill chunks and decode tokens in one step all go to the prefill kernel."""
    q, kc, vc, meta = paged_problem([1, 12, 1, 17], [30, 12, 16, 50], group=3)
    assert not meta.is_decode
    out = TritonBackend().attend(q, kc, vc, meta, 0.125, None)
    assert_close(out, reference_attention(q, kc, vc, meta, 0.125), FP32_TOL)


@pytest.mark.parametrize("dtype,window", [(torch.float32, None), (torch.float32, 20), (torch.float16, None)])
def test_backend_forward_matches_eager(dtype, window):
    """forward writes the step's K/V into the cache, then attends: a prompt, then two decode steps."""
    kv_heads, group, head_dim, page_size = 2, 4, 64, 16
    gen = torch.Generator().manual_seed(1)
    tables = [[6, 2, 9], [4, 0]]
    shape = (10, page_size, kv_heads, head_dim)
    caches = {name: (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for name in ("triton", "eager")}
    backends = {"triton": TritonBackend(), "eager": EagerBackend()}
    lens = [0, 0]
    tol = FP16_TOL if dtype == torch.float16 else FP32_TOL
    for q_lens in ([37, 20], [1, 1], [1, 1]):
        lens = [n + q for n, q in zip(lens, q_lens)]
        meta = build_metadata(q_lens, lens, tables, page_size)
        t = meta.num_tokens
        q = torch.randn(t, kv_heads * group, head_dim, generator=gen).to(dtype)
        k = torch.randn(t, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(t, kv_heads, head_dim, generator=gen).to(dtype)
        outs = {name: b.forward(q, k, v, *caches[name], meta, 0.125, window) for name, b in backends.items()}
        for a, b in zip(caches["triton"], caches["eager"]):
            assert torch.equal(a, b)
        assert outs["triton"].dtype == dtype
        # eager runs in `dtype` too, so compare both with the float64 reference over the same cache
        ref = reference_attention(q, *caches["eager"], meta, 0.125, window)
        assert_close(outs["triton"], ref, tol)
        assert_close(outs["eager"], ref, max(tol, 1e-2 if dtype == torch.float16 else tol))


def test_backend_decode_uses_splits_and_matches():
    """A decode step through the backend with a context long enough to be split."""
    q, kc, vc, meta = paged_problem([1, 1], [300, 17], kv_heads=1, group=2, head_dim=64)
    assert meta.is_decode
    out = TritonBackend().attend(q, kc, vc, meta, 0.125, None)
    assert_close(out, reference_attention(q, kc, vc, meta, 0.125), FP32_TOL)


def test_write_kv_then_read_through_decode():
    """KV written by write_kv at page edges is what the decode kernel reads."""
    q, kc, vc, meta = paged_problem([1, 1], [16, 17], group=1)
    k = torch.randn(2, 2, 64)
    v = torch.randn(2, 2, 64)
    write_kv(k, v, kc, vc, meta.slot_mapping)
    out = TritonBackend().attend(q, kc, vc, meta, 0.125, None)
    assert_close(out, reference_attention(q, kc, vc, meta, 0.125), FP32_TOL)


def test_probe_on_cpu_in_interpreter():
    result = TritonBackend().probe(cpu_device())
    assert result.available, result.reason
    assert result.seconds is not None
    assert TritonBackend.capabilities.cpu and TritonBackend().capabilities.cpu


def test_probe_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    result = TritonBackend().probe(cpu_device())
    assert not result.available
    assert result.reason == "Triton needs a CUDA GPU; set TRITON_INTERPRET=1 to run it in the interpreter"
    assert not TritonBackend.capabilities.cpu


def test_probe_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    result = TritonBackend().probe(cpu_device())
    assert (result.available, result.reason) == (False, "triton is not installed: pip install 'lowgear[triton]'")


def test_probe_refuses_old_and_simulated_gpus():
    backend = TritonBackend()
    p100 = DeviceInfo(index=0, kind="cuda", name="Tesla P100", compute_capability=(6, 0))
    assert "7.0" in backend.probe(p100).reason and not backend.probe(p100).available
    t4 = DeviceInfo(index=0, kind="cuda", name="T4", compute_capability=(7, 5), simulated=True)
    assert not backend.probe(t4).available


def test_capabilities_and_dtypes():
    caps = TritonBackend.capabilities
    assert (caps.paged, caps.varlen, caps.gqa, caps.sliding_window) == (True, True, True, True)
    assert caps.min_compute_capability == (7, 0) and caps.package == "triton"
    assert TritonBackend.prefers_sdpa_prefill_below_sm80
    assert torch.bfloat16 not in dtypes_for((7, 5))
    assert torch.bfloat16 in dtypes_for((8, 0))
    t4 = DeviceInfo(index=0, kind="cuda", name="T4", compute_capability=(7, 5))
    assert TritonBackend().capabilities_for(t4).dtypes == (torch.float16, torch.float32)


def test_import_does_not_import_triton():
    code = "import sys, lowgear.attention.triton, lowgear.ops.attention; assert 'triton' not in sys.modules"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_block_table_width_does_not_recompile_the_kernels():
    """The block table's row stride (its width, the most pages of a sequence in the batch) is left out
    of Triton's specialisation: otherwise widths 1, 2-15 and multiples of 16 compile apart, and the
    first prompt past one page stalls on a compile. Read from the compiled (not interpreted) kernels."""
    from helpers import compiled_results

    got = compiled_results(
        "import json\n"
        "from lowgear.ops.attention import paged_decode as D, paged_prefill as P\n"
        "from triton.backends.compiler import BaseBackend\n"
        "from triton._C.libtriton import native_specialize_impl\n"
        "out = {k.__name__: {p.name: p.do_not_specialize for p in k.params}\n"
        "       for k in (D.paged_decode_kernel, P.paged_prefill_kernel)}\n"
        "out['keys'] = [list(native_specialize_impl(BaseBackend, w, False, True, True)) for w in (1, 2, 16)]\n"
        "print('RESULTS' + json.dumps(out))\n", timeout=300)
    assert len({tuple(k) for k in got.pop("keys")}) == 3  # what specialising the width would cost
    for name, params in got.items():
        assert params["stride_bt"] is True, name
        assert params["stride_kp"] is False, name  # the cache strides stay specialised
