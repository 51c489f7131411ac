"""Decode attention over a quantized KV cache (ops/kv_write.QuantizedKV: int8, fp8_e4m3, int4) in the
split-K decode kernel, in Triton's interpreter: each of its forms (the whole-warp and split-D FMA forms,
the tl.dot form) against float64 eager attention over the dequantized cache, with odd and page-boundary
context lengths, GQA, unequal lengths in one batch, a sliding window, and launches of one split and of
several (the split-K combine), one with a CUDA graph's bound far past the lengths; and the triton rung
sending a quantized decode step to this kernel, not the prefill kernel.

Each token's keys and values are scaled by their own random factor, so each token's stored scale is
different and a scale read from the wrong token (or a nibble read from the wrong half of its byte)
changes the answer.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lowgear.attention.eager import reference_attention  # noqa: E402
from lowgear.attention.metadata import build_metadata  # noqa: E402
from lowgear.attention.triton import TritonBackend  # noqa: E402
from lowgear.ops.attention.common import dequantize  # noqa: E402
from lowgear.ops.kv_write import QuantizedKV, write_kv  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tests run Triton in its interpreter (TRITON_INTERPRET=1)"
)

KINDS = ["int8", "fp8_e4m3", "int4"]
# lengths 1 and odd, either side of 16-position page boundaries, unequal in one batch
KV_LENS = [1, 15, 16, 17, 33, 47, 70]
# fp32 math: the kernel and the reference read the same dequantized values; only summation order differs
FP32_TOL = 2e-5
# the tl.dot form rounds the query and the dequantized values to fp16 (tests/test_attention_triton.py's FP16_TOL)
FP16_TOL = 4e-3


def kernels():
    from lowgear.ops.attention import load

    return load(interpret=True)


def quantized_problem(kind, kv_lens, *, kv_heads=2, group=2, head_dim=32, page_size=16, dtype=torch.float32, seed=0):
    """Quantized caches holding every position of each sequence (pages scattered over the pool), one
    query per sequence, the decode step's metadata."""
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-n // page_size) for n in kv_lens]
    pool = sum(counts) + 2  # pages nobody owns
    order = torch.randperm(pool, generator=gen).tolist()
    tables = [order[sum(counts[:i]) : sum(counts[: i + 1])] for i in range(len(counts))]
    shape = (pool, page_size, kv_heads, head_dim)
    k_cache, v_cache = (QuantizedKV.zeros(shape, kind, dtype, "cpu") for _ in range(2))
    slots = build_metadata(kv_lens, kv_lens, tables, page_size).slot_mapping
    t = len(slots)
    factor = lambda: torch.exp(0.5 * torch.randn(t, kv_heads, 1, generator=gen))  # noqa: E731 (per token and head)
    k = torch.randn(t, kv_heads, head_dim, generator=gen) * 1.5 * factor()
    v = torch.randn(t, kv_heads, head_dim, generator=gen) * factor()
    write_kv(k, v, k_cache, v_cache, slots)
    meta = build_metadata([1] * len(kv_lens), kv_lens, tables, page_size)
    q = torch.randn(len(kv_lens), kv_heads * group, head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, meta


@triton.jit
def dequantize_kernel(x_ptr, out_ptr, shift, QUANT: tl.constexpr):
    offs = tl.arange(0, 256)
    tl.store(out_ptr + offs, dequantize(tl.load(x_ptr + offs), shift, QUANT))


def test_dequantize_every_code():
    """The kernels' shared `dequantize` on every byte: float8 e4m3 as torch decodes it (subnormals and
    both zeros included; the two NaN codes, never written, left out), int4 as its low and high nibble
    less 8, int8 as itself."""
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)

    def run(x, quant, shift=0):
        out = torch.empty(256)
        dequantize_kernel[(1,)](x, out, shift, QUANT=quant)
        return out

    e4m3 = every.view(torch.float8_e4m3fn).float()
    finite = ~torch.isnan(e4m3)
    assert finite.sum() == 254 and torch.equal(run(every, 2)[finite], e4m3[finite])
    assert torch.equal(run(every, 3, 0), (every & 0xF).float() - 8)  # the even element, low
    assert torch.equal(run(every, 3, 4), (every >> 4).float() - 8)
    assert torch.equal(run(every.view(torch.int8), 1), every.view(torch.int8).float())


def assert_close(out, ref, tol):
    assert out.shape == ref.shape and torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


# (form, group, head_dim, window): the whole-warp FMA form (split_d 0); the split-D form with 4 lanes
# of 16 codes over head_dim 64, and with 2 lanes over head_dim 80 (padded to 128: masked lanes, and
# int4 bytes past the row's 40); the tl.dot form (fp16 queries, GQA 3 padded to 16 rows).
FORMS = [
    ("whole_warp", 2, 32, None),
    ("split_d4", 2, 64, 20),
    ("split_d2", 1, 80, None),
    ("dot", 3, 64, 20),
]


@pytest.mark.parametrize("form,group,head_dim,window", FORMS, ids=[f[0] for f in FORMS])
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_decode_matches_reference_over_the_dequantized_cache(kind, form, group, head_dim, window):
    dot = form == "dot"
    q, k_cache, v_cache, meta = quantized_problem(kind, KV_LENS, group=group, head_dim=head_dim,
                                                  dtype=torch.float16 if dot else torch.float32)
    decode, _ = kernels()
    scale = head_dim**-0.5
    ref = reference_attention(q, k_cache.double(), v_cache.double(), meta, scale, window)
    if window:  # the window changes the answer, so the test would catch it being ignored
        assert (reference_attention(q, k_cache.double(), v_cache.double(), meta, scale) - ref).abs().max() > 1e-3
    # one split (the direct write); three, with 32-position blocks over 16-position pages; eight under
    # a CUDA graph's bound far past the lengths, so short sequences leave splits empty
    for splits, bound, block_n in ((1, meta.max_kv_len, 16), (3, meta.max_kv_len, 32), (8, 100_000, 16)):
        kw = {"window": window, "num_splits": splits}
        if dot:
            kw["use_dot"] = True
        else:
            kw.update(block_n=block_n, split_d={"whole_warp": 0, "split_d4": 4, "split_d2": 2}[form])
        out = decode.paged_decode(q, k_cache, v_cache, meta.block_tables, meta.kv_lens, scale, bound, **kw)
        assert out.dtype == q.dtype
        assert_close(out, ref, FP16_TOL if dot else FP32_TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_rung_sends_quantized_decode_to_the_decode_kernel(kind, monkeypatch):
    """A decode step over quantized pages runs the split-K decode kernel (the prefill kernel, which
    has no split over a sequence's pages, refuses here), with several splits for its few programs."""
    decode, prefill = kernels()
    launches = []
    original = decode.paged_decode

    def counted(*args, **kwargs):
        launches.append(kwargs)
        return original(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("a decode step went to the prefill kernel")

    monkeypatch.setattr(decode, "paged_decode", counted)
    monkeypatch.setattr(prefill, "paged_prefill", refuse)
    q, k_cache, v_cache, meta = quantized_problem(kind, [1, 17, 70], group=2)
    out = TritonBackend().attend(q, k_cache, v_cache, meta, 32**-0.5, None)
    assert len(launches) == 1 and not launches[0]["use_dot"]  # (the interpreter's: the FMA form)
    assert_close(out, reference_attention(q, k_cache.double(), v_cache.double(), meta, 32**-0.5), FP32_TOL)
