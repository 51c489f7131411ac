"""The triton rung on a real GPU: compiled kernels (not the interpreter) on model-sized shapes.

Llama-8B-like attention (32 query heads, 8 kv heads, head_dim 128), page size 256, contexts up to
4k, fp16 (bf16 where the GPU has it), checked against the float64 reference; plus the probe, the
decode step under CUDA-graph capture and a bandwidth sanity check. Skipped without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from lowgear.attention.eager import EagerBackend, reference_attention  # noqa: E402
from lowgear.attention.metadata import build_metadata  # noqa: E402
from lowgear.attention.triton import TritonBackend  # noqa: E402
from lowgear.platform.hardware import DeviceInfo  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels, not the interpreter"),
]

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 256
# fp16: output rounding (~1e-3 at |out| ~ 1) plus, in prefill, probabilities rounded to fp16
# before the P.V product; bf16 has 3 fewer mantissa bits.
TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def gpu_dtypes():
    if not torch.cuda.is_available():
        return [torch.float16]
    return [torch.float16, torch.bfloat16] if torch.cuda.get_device_capability() >= (8, 0) else [torch.float16]


def problem(q_lens, kv_lens, dtype=torch.float16, seed=0, heads=HEADS, kv_heads=KV_HEADS):
    gen = torch.Generator().manual_seed(seed)
    counts = [(kv + PAGE - 1) // PAGE for kv in kv_lens]
    pool = sum(counts) + 2
    order = torch.randperm(pool, generator=gen).tolist()
    tables, i = [], 0
    for n in counts:
        tables.append(order[i : i + n])
        i += n
    dev = torch.device("cuda")
    k_cache = torch.randn(pool, PAGE, kv_heads, HEAD_DIM, generator=gen).to(dev, dtype)
    v_cache = torch.randn(pool, PAGE, kv_heads, HEAD_DIM, generator=gen).to(dev, dtype)
    meta = build_metadata(list(q_lens), list(kv_lens), tables, PAGE, device=dev)
    q = torch.randn(meta.num_tokens, heads, HEAD_DIM, generator=gen).to(dev, dtype)
    return q, k_cache, v_cache, meta


def check(out, ref, dtype):
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL[dtype], f"max error {err:.3g}"


CONTEXTS = [1, 255, 256, 257, 1000, 2049, 3071, 4096]


@pytest.mark.parametrize("dtype", gpu_dtypes())
@pytest.mark.parametrize("window", [None, 1024])
def test_decode_on_gpu(dtype, window):
    q, kc, vc, meta = problem([1] * len(CONTEXTS), CONTEXTS, dtype)
    ref = reference_attention(q, kc, vc, meta, HEAD_DIM**-0.5, window)
    check(TritonBackend().attend(q, kc, vc, meta, HEAD_DIM**-0.5, window), ref, dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 16, 64])
def test_decode_splits_on_gpu(num_splits):
    from lowgear.ops.attention import load

    decode, _ = load(interpret=False)
    q, kc, vc, meta = problem([1, 1, 1], [4096, 33, 1500])
    ref = reference_attention(q, kc, vc, meta, 0.088)
    out = decode.paged_decode(q, kc, vc, meta.block_tables, meta.kv_lens, 0.088, meta.max_kv_len, num_splits=num_splits)
    check(out, ref, torch.float16)


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3", "int4"])
def test_quantized_cache_in_a_frame_on_gpu(kind):
    """A cache storing (x - shift) @ Hadamard (ops/kv_write.py), keys with large channels: the triton rung's
    prefill and decode kernels given rotated queries, the output rotated and shifted back, against float64
    attention over the cache restored to the model's frame."""
    from lowgear.ops.kv_write import QuantizedKV, restore_output, rotate_query, write_kv

    lens = [1, 255, 257, 1000, 4096]
    for q_lens in ([1] * len(lens), [1, 100, 257, 3, 64]):
        q, kc, vc, meta = problem(q_lens, lens)
        k_cache, v_cache = (QuantizedKV.zeros(kc.shape, kind, torch.float16, "cuda", rotate=True) for _ in range(2))
        big = torch.zeros(KV_HEADS, HEAD_DIM, device="cuda")
        big[:, 5], big[:, 70] = 15.0, -8.0
        k_cache.shift, v_cache.shift = big, torch.full((KV_HEADS, HEAD_DIM), 0.5, device="cuda")
        slots = build_metadata(lens, lens, [t[: -(-n // PAGE)] for t, n in zip(meta.block_tables.tolist(), lens)],
                               PAGE, device="cuda").slot_mapping
        k, v = kc.view(-1, KV_HEADS, HEAD_DIM)[slots] + big.half(), vc.view(-1, KV_HEADS, HEAD_DIM)[slots] + 0.5
        write_kv(k, v, k_cache, v_cache, slots)
        ref = reference_attention(q, k_cache.restore(k_cache.double()), v_cache.restore(v_cache.double()), meta, 0.088)
        out = TritonBackend().attend(rotate_query(q, k_cache), k_cache, v_cache, meta, 0.088, None)
        check(restore_output(out, v_cache), ref, torch.float16)


@pytest.mark.parametrize("split_d", [0, 4, 8])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (24, 8), (32, 4)])
def test_decode_fma_forms_on_gpu(heads, kv_heads, split_d):
    """The FMA forms (what sm_70 / sm_75 run; the default split_d and the whole-warp form) compiled for
    this GPU, GQA ratios 1/3/8, a graph-style bound far past the lengths."""
    from lowgear.ops.attention import load

    decode, _ = load(interpret=False)
    q, kc, vc, meta = problem([1] * 5, [1, 17, 512, 777, 4000], heads=heads, kv_heads=kv_heads)
    ref = reference_attention(q, kc, vc, meta, 0.088)
    out = decode.paged_decode(q, kc, vc, meta.block_tables, meta.kv_lens, 0.088, 65536, split_d=split_d,
                              target_programs=decode.fma_form()[1] * 132)
    check(out, ref, torch.float16)


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3", "int4"])
def test_quantized_decode_forms_on_gpu(kind):
    """Decode over a quantized cache (QuantizedKV) compiled for this GPU, in the FMA forms (whole-warp
    and split-D) and, from sm_80, the tl.dot form, against the reference over the dequantized cache;
    a graph-style bound far past the lengths."""
    from lowgear.ops.attention import load
    from lowgear.ops.kv_write import QuantizedKV, write_kv

    decode, _ = load(interpret=False)
    lens = [1, 255, 257, 1000, 4096]
    q, kc, vc, meta = problem([1] * len(lens), lens)
    k_cache, v_cache = (QuantizedKV.zeros(kc.shape, kind, torch.float16, "cuda") for _ in range(2))
    slots = build_metadata(lens, lens, [t[: -(-n // PAGE)] for t, n in zip(meta.block_tables.tolist(), lens)],
                           PAGE, device="cuda").slot_mapping
    write_kv(kc.view(-1, KV_HEADS, HEAD_DIM)[slots], vc.view(-1, KV_HEADS, HEAD_DIM)[slots], k_cache, v_cache, slots)
    ref = reference_attention(q, k_cache.double(), v_cache.double(), meta, 0.088)
    forms = [{"split_d": 0}, {"split_d": 4}]
    if torch.cuda.get_device_capability() >= (8, 0):
        forms.append({"use_dot": True})
    for form in forms:
        out = decode.paged_decode(q, k_cache, v_cache, meta.block_tables, meta.kv_lens, 0.088, 65536, **form)
        check(out, ref, torch.float16)


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (24, 8), (32, 4)])
def test_decode_gqa_ratios_on_gpu(heads, kv_heads):
    q, kc, vc, meta = problem([1] * 4, [17, 512, 777, 4000], heads=heads, kv_heads=kv_heads)
    ref = reference_attention(q, kc, vc, meta, 0.088)
    check(TritonBackend().attend(q, kc, vc, meta, 0.088, None), ref, torch.float16)


@pytest.mark.parametrize("dtype", gpu_dtypes())
@pytest.mark.parametrize("window", [None, 700])
def test_prefill_on_gpu(dtype, window):
    """Whole prompts, chunks over cached prefixes, and decode tokens in one mixed step."""
    q_lens = [1, 300, 1024, 77, 1]
    kv_lens = [1, 300, 2048, 4000, 3000]
    q, kc, vc, meta = problem(q_lens, kv_lens, dtype)
    ref = reference_attention(q, kc, vc, meta, HEAD_DIM**-0.5, window)
    check(TritonBackend().attend(q, kc, vc, meta, HEAD_DIM**-0.5, window), ref, dtype)


def test_forward_matches_eager_on_gpu():
    """A 2k prompt chunked in two, then decode steps, through forward (write_kv + attend)."""
    gen = torch.Generator().manual_seed(3)
    dev = torch.device("cuda")
    tables = [list(range(0, 12)), list(range(12, 20))]
    shape = (20, PAGE, KV_HEADS, HEAD_DIM)
    caches = {n: (torch.zeros(shape, dtype=torch.float16, device=dev), torch.zeros(shape, dtype=torch.float16, device=dev)) for n in "te"}
    backends = {"t": TritonBackend(), "e": EagerBackend()}
    lens = [0, 0]
    for q_lens in ([1024, 700], [1000, 1], [1, 1], [1, 1]):
        lens = [n + q for n, q in zip(lens, q_lens)]
        meta = build_metadata(q_lens, lens, tables, PAGE, device=dev)
        t = meta.num_tokens
        q, k, v = (torch.randn(t, h, HEAD_DIM, generator=gen).to(dev, torch.float16) for h in (HEADS, KV_HEADS, KV_HEADS))
        out = {n: b.forward(q, k, v, *caches[n], meta, HEAD_DIM**-0.5) for n, b in backends.items()}
        assert torch.equal(caches["t"][0], caches["e"][0])
        check(out["t"], reference_attention(q, *caches["e"], meta, HEAD_DIM**-0.5), torch.float16)


def test_probe_on_gpu():
    props = torch.cuda.get_device_properties(0)
    device = DeviceInfo(
        index=0, kind="cuda", name=props.name, compute_capability=(props.major, props.minor),
        sm_count=props.multi_processor_count,
    )  # fmt: skip
    result = TritonBackend().probe(device)
    assert result.available, result.reason
    assert result.seconds is not None and result.seconds < 0.5


def test_decode_under_cuda_graph():
    """Fixed shapes and no host sync: the decode step can be captured once and replayed."""
    from lowgear.ops.attention import load

    decode, _ = load(interpret=False)
    q, kc, vc, meta = problem([1] * 4, [100, 2000, 4000, 3000])
    kv_lens = meta.kv_lens.clone()
    out = torch.empty_like(q)
    args = (q, kc, vc, meta.block_tables, kv_lens, 0.088, 4096)
    decode.paged_decode(*args, num_splits=8, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode.paged_decode(*args, num_splits=8, out=out)
    kv_lens.copy_(torch.tensor([101, 1999, 4096, 1], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    moved = build_metadata([1] * 4, [101, 1999, 4096, 1], [t.tolist() for t in meta.block_tables.cpu()], PAGE, device="cuda")
    check(out, reference_attention(q, kc, vc, moved, 0.088), torch.float16)


def test_decode_bandwidth_sanity():
    """Decode reads each sequence's K/V once; report the achieved bandwidth (loose floor)."""
    batch, context = 16, 4096
    q, kc, vc, meta = problem([1] * batch, [context] * batch)
    backend = TritonBackend()
    props = torch.cuda.get_device_properties(0)
    backend._sm_counts[0] = props.multi_processor_count
    for _ in range(3):
        backend.attend(q, kc, vc, meta, 0.088, None)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        backend.attend(q, kc, vc, meta, 0.088, None)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 20
    bytes_read = 2 * batch * context * KV_HEADS * HEAD_DIM * 2
    gbps = bytes_read / seconds / 1e9
    print(f"decode B={batch} ctx={context}: {seconds * 1e6:.1f} us, {gbps:.0f} GB/s")
    assert gbps > 200
