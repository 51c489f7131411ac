"""The sdpa rung against the float64 eager reference: odd lengths, GQA, page boundaries, windows, batching modes."""

import random

import pytest
import torch

from lowgear.attention.eager import reference_attention
from lowgear.attention.metadata import build_metadata
from lowgear.attention.sdpa import SdpaBackend, gather_packed, gather_padded, probe_case
from lowgear.platform.hardware import cpu_device


def make_step(q_lens, kv_lens, kv_heads, group, head_dim, page_size, seed=0, dtype=torch.float32):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n_pages = [-(-kv // page_size) for kv in kv_lens]
    pool = list(range(sum(n_pages) + 2))
    rng.shuffle(pool)  # pages scattered, so page boundaries are real
    tables, at = [], 0
    for n in n_pages:
        tables.append(pool[at : at + n])
        at += n
    pages = len(pool)
    k_cache = torch.randn(pages, page_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(pages, page_size, kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), kv_heads * group, head_dim, generator=gen).to(dtype)
    meta = build_metadata(q_lens, kv_lens, tables, page_size)
    return q, k_cache, v_cache, meta


CASES = [
    # q_lens, kv_lens, page_size
    ([7], [7], 4),  # one prefill, odd, crosses pages
    ([1, 1, 1], [5, 16, 33], 16),  # decode, unequal, exactly on and past a page boundary
    ([5, 1, 3], [5, 9, 17], 8),  # mixed prefill chunks and decode
    ([4, 11], [20, 11], 16),  # a chunk continuing a context + a fresh prompt
]


@pytest.mark.parametrize("batched", ["decode", "always", "never"])
@pytest.mark.parametrize("q_lens,kv_lens,page_size", CASES)
@pytest.mark.parametrize("group", [1, 3, 8])
def test_matches_reference(batched, q_lens, kv_lens, page_size, group):
    q, kc, vc, meta = make_step(q_lens, kv_lens, kv_heads=2, group=group, head_dim=64, page_size=page_size)
    scale = 64**-0.5
    out = SdpaBackend(batched=batched).attend(q, kc, vc, meta, scale, None)
    ref = reference_attention(q, kc, vc, meta, scale)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("window", [None, 1, 3, 9])
@pytest.mark.parametrize("batched", ["decode", "always", "never"])
def test_window_and_head_dim(head_dim, window, batched):
    q, kc, vc, meta = make_step([3, 1, 6], [13, 10, 6], kv_heads=1, group=3, head_dim=head_dim, page_size=4, seed=1)
    scale = head_dim**-0.5
    out = SdpaBackend(batched=batched).attend(q, kc, vc, meta, scale, window)
    ref = reference_attention(q, kc, vc, meta, scale, window)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("expand", [False, True])
def test_gqa_by_repeat_matches_enable_gqa(expand):
    q, kc, vc, meta = make_step([2, 5], [9, 5], kv_heads=2, group=4, head_dim=64, page_size=4, seed=2)
    backend = SdpaBackend(batched="always")
    backend.expand_kv_with_mask = expand
    out = backend.attend(q, kc, vc, meta, 0.125, None)
    torch.testing.assert_close(out.double(), reference_attention(q, kc, vc, meta, 0.125), atol=1e-4, rtol=1e-4)


def test_half_precision_close():
    q, kc, vc, meta = make_step([1, 1], [17, 3], kv_heads=2, group=2, head_dim=64, page_size=16, seed=3)
    scale = 0.125
    ref = reference_attention(q, kc, vc, meta, scale)
    out = SdpaBackend().attend(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), meta, scale, None)
    assert (out.double() - ref).abs().max() < 5e-2


def test_gathers_agree():
    q, kc, vc, meta = make_step([1, 2], [10, 3], kv_heads=2, group=1, head_dim=64, page_size=4)
    padded = gather_padded(kc, meta)
    packed, cu = gather_packed(kc, meta)
    assert padded.shape == (2, 10, 2, 64) and packed.shape == (13, 2, 64)
    assert cu.tolist() == [0, 10, 13]
    torch.testing.assert_close(packed[:10], padded[0])
    torch.testing.assert_close(packed[10:], padded[1, :3])


def test_forward_writes_cache_then_attends():
    q, kc, vc, meta = make_step([3], [3], kv_heads=2, group=2, head_dim=64, page_size=2)
    k = torch.randn(3, 2, 64)
    v = torch.randn(3, 2, 64)
    out = SdpaBackend().forward(q, k, v, kc, vc, meta, 0.125)
    torch.testing.assert_close(out.double(), reference_attention(q, kc, vc, meta, 0.125), atol=1e-4, rtol=1e-4)


def test_probe_on_cpu():
    result = SdpaBackend().probe(cpu_device())
    assert result.available, result.reason
    assert "probe call ok" in result.reason


def test_probe_case_reference_is_float64():
    case = probe_case(torch.device("cpu"), torch.float32)
    assert case.expected.dtype == torch.float64
    assert case.check(case.expected.float()) is None


@pytest.mark.parametrize("cc,flash_on,expand", [((7, 5), True, True), ((7, 0), True, True), ((8, 0), True, False),
                                                ((9, 0), False, True)])
def test_gqa_prefill_repeats_kv_heads_where_sdpa_has_no_flash_kernel(cc, flash_on, expand, monkeypatch):
    """A causal GQA prefill on a GPU without torch's flash kernel (sm < 8.0, or flash switched off)
    repeats the kv heads instead of passing enable_gqa, which only flash and math take: the
    memory-efficient kernel then serves it instead of math's full score matrix."""
    from lowgear.platform import hardware

    gpu = hardware.DeviceInfo(index=0, kind="cuda", name="Test GPU", compute_capability=cc,
                              total_memory=16 * 2**30, torch_arch_list=("sm_70", "sm_75", "sm_80", "sm_90"))
    monkeypatch.setattr(torch.backends.cuda, "flash_sdp_enabled", lambda: flash_on)
    backend = SdpaBackend()
    backend.probe_device = torch.device("cpu")
    assert backend.probe(gpu).available
    cuda0 = torch.device("cuda", 0)
    assert backend._expand(False, cuda0) is expand
    assert backend._expand(True, cuda0) is True  # a mask: always repeated on CUDA (memory-efficient takes masks)
    assert backend._expand(False, torch.device("cpu")) is False


def test_without_cudnn_leaves_out_cudnn_alone_and_restores():
    """torch's cuDNN attention builds a graph per new length (sdpa.py): the rung's CUDA calls leave it
    out, keep whatever else is enabled as it is, and put everything back after."""
    from lowgear.attention.sdpa import without_cudnn

    b = torch.backends.cuda
    before = (b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled())
    assert before[0], "torch enables cuDNN attention by default"
    with without_cudnn(torch.device("cpu")):
        assert b.cudnn_sdp_enabled()  # nothing changes off CUDA
    with without_cudnn(torch.device("cuda", 0)):
        assert (b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(),
                b.math_sdp_enabled()) == (False,) + before[1:]
    assert (b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled()) == before
    b.enable_flash_sdp(False)  # a family the user switched off stays off inside
    try:
        with without_cudnn(torch.device("cuda", 0)):
            assert not b.cudnn_sdp_enabled() and not b.flash_sdp_enabled() and b.mem_efficient_sdp_enabled()
    finally:
        b.enable_flash_sdp(before[1])


@pytest.mark.parametrize("batched", ["decode", "always", "never"])
def test_every_call_of_the_rung_runs_without_cudnn(batched, monkeypatch):
    import lowgear.attention.sdpa as S

    seen = []
    real_sdpa, real_ctx = S.F.scaled_dot_product_attention, S.without_cudnn

    def recording(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(S.F, "scaled_dot_product_attention", recording)
    monkeypatch.setattr(S, "without_cudnn", lambda device: real_ctx(torch.device("cuda", 0)))  # as if on CUDA
    for q_lens, kv_lens, page in CASES[1:3]:
        q, kc, vc, meta = make_step(q_lens, kv_lens, 2, 3, 16, page)
        out = SdpaBackend(batched).attend(q, kc, vc, meta, 0.25, None)
        ref = reference_attention(q.double(), kc.double(), vc.double(), meta, 0.25, None)
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    assert seen and not any(seen) and torch.backends.cuda.cudnn_sdp_enabled()
