"""model.py's CUDA step (`Model._forward_fused`: fused residual-add + RMSNorm, RoPE fused with the
cache write, SwiGLU's silu x up in one kernel) against the plain step, on the CPU.

The fused step normally runs only on CUDA devices; here it is called directly, its Triton kernels
running in the interpreter (conftest sets TRITON_INTERPRET=1), on a tiny float32 model (fused q|k|v and
gate|up, the default): a 7-token
prompt in one step, then two decode steps through pages that the prompt left half full, and a
two-sequence step of unequal lengths. Logits and the cache contents must equal the plain path's.
"""

from __future__ import annotations

import pytest
import torch
from helpers import load

from lowgear.attention.metadata import build_metadata
from lowgear.bench.synthetic import write_hf

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = write_hf(tmp_path_factory.mktemp("fused") / "m", arch="llama", hidden_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, intermediate_size=96, seed=5)
    return load(path, max_seq_len=64, page_size=4, dtype="float32"), load(path, max_seq_len=64, page_size=4,
                                                                            dtype="float32")


def _step(model, cache, fused, ids, q_lens, kv_lens, tables):
    meta = build_metadata(q_lens, kv_lens, tables, cache.page_size, device=model.layer_devices[0], logits="all")
    x = torch.tensor(ids)
    if fused:
        with torch.inference_mode():
            h = model.embed.lookup(x).to(model.dtype)
            return model._forward_fused(h, meta, cache)
    return model.forward(x, meta, cache)


def test_fused_step_equals_plain_step(models):
    (fm, fc), (pm, pc) = models
    assert fm.layers[0].mlp.gate_up is not None and fm.layers[0].attn.qkv is not None
    steps = [([5, 17, 3, 99, 42, 7, 250], [7], [7], [[0, 1]]),
             ([8], [1], [8], [[0, 1]]),
             ([61], [1], [9], [[0, 1, 2]]),
             ([13, 77, 2, 4], [1, 3], [10, 3], [[0, 1, 2], [5]])]
    for ids, q_lens, kv_lens, tables in steps:
        a = _step(fm, fc, True, ids, q_lens, kv_lens, tables)
        b = _step(pm, pc, False, ids, q_lens, kv_lens, tables)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for i in range(len(fm.layers)):
        for x, y in zip(fc.layer(i), pc.layer(i)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
