"""A decode step makes no host<->device copy and no host sync, with every packed format as the
embedding table and the head.

On CUDA the decode step is captured in a graph, where a tensor built from host data (torch.tensor
of a Python list: a host-to-device copy) or a read back to the host (.item(), .tolist(), a
data-dependent shape) is an error: a Q4_K embedding once crashed graph capture that way. The CPU
can't capture graphs, so this runs the same step under a dispatch guard that records every such
operation; the GPU run (tests/test_generator_graphs_gpu.py) captures the real graph.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import load
from lowgear.attention.metadata import build_metadata
from lowgear.formats.blocks import QUANT_FORMATS

# aten ops that move host data into a tensor or read a tensor back to the host
HOST_OPS = {
    "aten.lift_fresh.default": "a tensor built from host data (torch.tensor(list))",
    "aten.lift_fresh_copy.default": "a tensor built from host data",
    "aten._local_scalar_dense.default": "a read back to the host (.item(), int(t), bool(t))",
    "aten.nonzero.default": "a data-dependent shape (nonzero)",
    "aten.masked_select.default": "a data-dependent shape (masked_select)",
    "aten._unique2.default": "a data-dependent shape (unique)",
}


class HostTrafficGuard(TorchDispatchMode):
    """Records every op in HOST_OPS, every copy between devices, and every .tolist()/.numpy()."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in HOST_OPS:
            self.found.append(f"{name}: {HOST_OPS[name]}")
        out = func(*args, **kwargs)
        if name in ("aten._to_copy.default", "aten.copy_.default"):
            src = args[1] if name == "aten.copy_.default" else args[0]
            dst = args[0] if name == "aten.copy_.default" else out
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.device != dst.device:
                self.found.append(f"{name}: a copy {src.device} -> {dst.device}")
        return out


@contextlib.contextmanager
def host_traffic_guard():
    guard = HostTrafficGuard()
    originals = {m: getattr(torch.Tensor, m) for m in ("tolist", "numpy")}

    def flag(method):
        def wrapped(self, *a, **k):
            guard.found.append(f"Tensor.{method}: a read back to the host")
            return originals[method](self, *a, **k)
        return wrapped

    for m in originals:
        setattr(torch.Tensor, m, flag(m))
    try:
        with guard:
            yield guard
    finally:
        for m, f in originals.items():
            setattr(torch.Tensor, m, f)


def test_guard_catches_host_data_and_syncs():
    """The guard itself: each kind of host traffic it claims to see is seen (and plain ops are not)."""
    x = torch.arange(6.0)
    cases = {
        "lift_fresh": lambda: torch.tensor([0, 4]),
        "_local_scalar_dense": lambda: x.sum().item(),
        "nonzero": lambda: x.nonzero(),
        "tolist": lambda: x.tolist(),
    }
    for key, fn in cases.items():
        with host_traffic_guard() as g:
            fn()
        assert any(key in f for f in g.found), (key, g.found)
    with host_traffic_guard() as g:
        (x * 2 + torch.arange(6.0, device=x.device)).softmax(-1).index_select(0, torch.arange(3))
    assert g.found == []


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from lowgear.bench.synthetic import write_gguf

    root = tmp_path_factory.mktemp("host_traffic")
    shape = dict(arch="llama", hidden_size=256, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=256)
    made = {q: write_gguf(root / f"m-{q}.gguf", qtype=q, seed=5, **shape) for q in QUANT_FORMATS}
    # qwen3: the per-head q/k RMSNorm runs in the step too (head_dim 48, not hidden / heads)
    made["qwen3"] = write_gguf(root / "m-qwen3.gguf", qtype="Q8_0", seed=5, head_dim=48, **{**shape, "arch": "qwen3"})
    return made


@pytest.mark.parametrize("rung", ["eager", "sdpa"])
@pytest.mark.parametrize("qtype", [*sorted(QUANT_FORMATS), "qwen3"])
def test_decode_step_has_no_host_traffic(files, qtype, rung):
    model, cache = load(files[qtype], max_seq_len=256, page_size=16, attn_backend=rung, cpu_weights="packed")
    if qtype == "qwen3":
        assert model.layers[0].attn.q_norm is not None
        qtype = "Q8_0"
    assert model.embed.qtype == qtype and model.lm_head.qtype == qtype and model.lm_head is not model.embed
    ps = cache.page_size
    # two sequences, one ending on a page boundary, filled by a prefill step first
    lens = [5, 2 * ps]
    tables = [[0], [1, 2]]
    prompt = torch.arange(3, 3 + sum(lens)) % 200
    model.forward(prompt, build_metadata(lens, lens, tables, ps), cache)
    meta = build_metadata([1, 1], [n + 1 for n in lens], [[0], [1, 2, 3]], ps)
    ids = torch.tensor([7, 11])
    with host_traffic_guard() as g:
        logits = model.forward(ids, meta, cache)
    assert g.found == [], (qtype, rung, g.found)
    assert logits.shape == (2, model.lm_head.out_features) and torch.isfinite(logits).all()
