"""The packed kernels on a real GPU at real layer shapes, against torch dequantize-then-matmul.

Marked gpu: collected everywhere, skipped without CUDA. `bench_gemv` is the timing helper a
benchmark calls (achieved GB/s of packed weight bytes); tests never time anything. Running this file
as a script prints the GB/s table: `python tests/test_quant_kernels_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

from lowgear.formats.dequant import dequantize_data
from lowgear.ops.matmul import dequantize_tile, packed_matmul
from lowgear.ops.matmul.gguf_gemv import BLOCK_BYTES, BLOCK_SIZES

QTYPES = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"]
LOW_QTYPES = ["Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"]  # GEMV only (prefill dequantizes through torch)
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (out_features, in_features): attn, up, down
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,),
              "Q2_K": (80, 82), "Q3_K": (108,), "IQ4_NL": (0,), "IQ4_XS": (0,)}


def random_packed(qtype: str, n: int, k: int, device="cuda", seed: int = 0) -> torch.Tensor:
    """Random packed bytes with every f16 scale field set to a small finite value."""
    gen = torch.Generator(device=device).manual_seed(seed)
    nblk, bb = k // BLOCK_SIZES[qtype], BLOCK_BYTES[qtype]
    raw = torch.randint(0, 256, (n, nblk, bb), dtype=torch.uint8, device=device, generator=gen)
    for off in F16_FIELDS[qtype]:
        scale = (torch.randn(n, nblk, device=device, generator=gen) * 0.02).to(torch.float16)
        raw[:, :, off:off + 2] = scale.view(torch.uint8).view(n, nblk, 2)
    return raw.view(n, nblk * bb)


def bench_gemv(qtype: str, n: int, k: int, m: int = 1, dtype: torch.dtype = torch.float16,
               iters: int = 200, warmup: int = 20, device: str = "cuda", graph: bool = True) -> dict:
    """Time packed_matmul on one weight shape; returns us per call and GB/s of weight bytes read.

    With `graph` (default) the calls are captured once in a CUDA graph and replayed, as the decode
    step is, so the number is the kernel's; graph=False includes the Python launch cost. Weights are
    random (speed does not depend on values). For F16/BF16/F32 the "packed" bytes are the plain weight. L2 is not flushed: a 4096x4096 Q4 weight (9 MB) fits an H100's
    50 MB L2, so report shapes larger than L2 (or several weights in rotation) as the roofline number.
    """
    float_types = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    if qtype in float_types:
        data = torch.randn(n, k, device=device).to(float_types[qtype])
    else:
        data = random_packed(qtype, n, k, device)
    x = torch.randn(m, k, device=device, dtype=dtype)
    y = packed_matmul(x, qtype, data, n, k)
    for _ in range(warmup):
        packed_matmul(x, qtype, data, n, k)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if graph:  # replaying a captured graph times the kernels, not Python's launch overhead
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(iters):
                y = packed_matmul(x, qtype, data, n, k)
        g.replay()
        torch.cuda.synchronize()
        start.record()
        g.replay()
        stop.record()
    else:
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            packed_matmul(x, qtype, data, n, k)
        stop.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(stop) / 1e3 / iters
    nbytes = data.numel() * data.element_size()
    return {"qtype": qtype, "n": n, "k": k, "m": m, "us": seconds * 1e6, "GB/s": nbytes / seconds / 1e9,
            "bytes": nbytes}


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", QTYPES + LOW_QTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", [1, 5, 16])
def test_packed_matmul_real_shapes(qtype, shape, m):
    n, k = shape
    data = random_packed(qtype, n, k, seed=m)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    y = packed_matmul(x, qtype, data, n, k)
    ref = x.float() @ dequantize_data(qtype, data, torch.float32).t()
    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    assert err < 3e-3, err


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_tile_real_shape(qtype):
    n, k = 14336, 4096
    data = random_packed(qtype, n, k, seed=3)
    tile = dequantize_tile(qtype, data, 1000, 5096, torch.float32)
    torch.testing.assert_close(tile, dequantize_data(qtype, data[1000:5096], torch.float32), rtol=1e-6,
                               atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["F16", "BF16"])
def test_float_gemv_real_shape(qtype):
    wdtype = torch.float16 if qtype == "F16" else torch.bfloat16
    w = torch.randn(4096, 4096, device="cuda").to(wdtype)
    x = torch.randn(4, 4096, device="cuda", dtype=wdtype)
    y = packed_matmul(x, qtype, w, 4096, 4096)
    ref = x.float() @ w.float().t()
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2


@pytest.mark.gpu
def test_prefill_path_real_shape():
    data = random_packed("Q4_K", 4096, 4096, seed=9)
    x = torch.randn(64, 4096, device="cuda", dtype=torch.float16)
    y = packed_matmul(x, "Q4_K", data, 4096, 4096)
    ref = x.float() @ dequantize_data("Q4_K", data, torch.float32).t()
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 3e-3


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
    for qtype in QTYPES + ["F16"]:
        for n, k in SHAPES:
            for m in (1, 4, 16):
                r = bench_gemv(qtype, n, k, m)
                eager = bench_gemv(qtype, n, k, m, graph=False)
                print(f"{qtype:5s} {n:6d}x{k:<6d} m={m:<3d} {r['us']:9.1f} us {r['GB/s']:8.1f} GB/s"
                      f"   (eager launches: {eager['us']:7.1f} us)")
        for n, k in SHAPES[1:2]:  # the prefill alternative for the larger M: tile dequant + cuBLAS
            data = random_packed(qtype, n, k) if qtype != "F16" else None
            if data is not None:
                x = torch.randn(16, k, device="cuda", dtype=torch.float16)
                x @ dequantize_tile(qtype, data, 0, n, torch.float16).t()  # compile outside the timing
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    x @ dequantize_tile(qtype, data, 0, n, torch.float16).t()
                stop.record()
                torch.cuda.synchronize()
                print(f"{qtype:5s} {n:6d}x{k:<6d} m=16  dequant+matmul {start.elapsed_time(stop) / 20 * 1e3:9.1f} us")
