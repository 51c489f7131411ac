"""ops/matmul/splitk.py: the in-kernel split-K finish (last program of a tile adds the partials).

Run through the GPTQ GEMV, whose splits can be forced: every split count gives the float64 result,
the counters are back at 0 after each launch (so the next launch, or a graph replay, starts clean),
repeated launches are bit-identical (the sum runs in split order whichever program ends last), and
the chunked partial loads agree for every S_CHUNK. On machines without CUDA this runs in Triton's
interpreter (conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch
from helpers import interpreter_index_shim
from test_quant_kernels_gptq import DEVICE, linear, make_gptq, rel_err, xs

pytest.importorskip("triton")

from lowgear.ops.matmul import gptq_gemv as G
from lowgear.ops.matmul import splitk  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _interpreter_numpy_shim():
    with interpreter_index_shim():
        yield


@pytest.mark.parametrize("split", [1, 2, 5, 12])
def test_every_split_count_gives_the_reference_and_leaves_counters_at_zero(split):
    w, ref = make_gptq(4, 200, 384, 32, seed=11)
    lin = linear(w)
    x = xs(3, 384).to(DEVICE)
    run = lambda: G.gptq_gemv(x, lin.qweight, lin.gptq_zeros, lin.scales, None, 4, 32,  # noqa: E731
                              lin._gptq_kernel["block_r"], split=split)
    y = run()
    assert rel_err(y, x.double().cpu() @ ref.T) < 1e-5
    assert int(splitk.counters(x.device, 1).abs().sum()) == 0
    assert torch.equal(run(), y)


def test_chunk_sizes_keep_registers_bounded():
    assert splitk.chunk(4) == 16 and splitk.chunk(8) == 8 and splitk.chunk(32) == 2
    assert splitk.chunk(64) == 1 and splitk.chunk(1000) == 1
    assert all(splitk.chunk(e) & (splitk.chunk(e) - 1) == 0 for e in range(1, 200))


def test_counters_grow_and_stay_zero():
    dev = torch.device(DEVICE)
    a = splitk.counters(dev, 10)
    assert a.numel() >= splitk.MIN_COUNTERS and int(a.abs().sum()) == 0
    b = splitk.counters(dev, splitk.MIN_COUNTERS + 5)
    assert b.numel() >= splitk.MIN_COUNTERS + 5 and int(b.abs().sum()) == 0
    assert splitk.counters(dev, 3) is b


def test_counters_are_not_allocated_during_graph_capture(monkeypatch):
    """An allocation inside CUDA-graph capture would come from the graph's private pool: refused with
    a message saying what to do (the generator always runs a step eagerly before it captures)."""
    monkeypatch.setattr(splitk, "_COUNTERS", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="before CUDA-graph capture.*eagerly first"):
        splitk.counters(torch.device("cuda", 0), 8)
