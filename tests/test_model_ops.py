"""The whole model on each op set (ops/dispatch.py's torch and Triton ops) against Hugging Face
transformers on the same weights, step by step through a paged cache, and the one Triton decision
the ops come from.

Two prompts of odd lengths (7 and 5 tokens, page size 4) are prefilled together, then decoded a token
at a time across page boundaries; each step's logits must equal transformers' logits at those
positions of the whole sequences. Without CUDA the Triton ops run in the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from helpers import hf_logits, interpreter_index_shim, load, use_ops
from lowgear.attention.metadata import build_metadata
from lowgear.ops import dispatch
from lowgear.platform import hardware

transformers = pytest.importorskip("transformers")
pytest.importorskip("triton")

PAGE = 4
TABLES = [[2, 0, 3], [1, 4]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_model_hf import _tiny

    return _tiny("llama", tmp_path_factory.mktemp("ops"))


@pytest.mark.parametrize("make_ops", [dispatch.torch_ops, dispatch.triton_ops], ids=["torch", "triton"])
def test_paged_steps_match_transformers(tiny, make_ops):
    hf, folder = tiny
    model, cache = load(folder, max_seq_len=64, page_size=PAGE, dtype="float32")
    if model.layer_devices[0].type == "cpu":
        assert model.layer_ops[0].name == "torch"  # the CPU's decision
    use_ops(model, make_ops())
    seqs = [[5, 17, 3, 99, 42, 7, 250, 11, 60, 8, 123], [13, 77, 2, 4, 180, 31, 9]]
    done = [0, 0]
    want = [hf_logits(hf, s) for s in seqs]
    with interpreter_index_shim():
        for q_lens in ([7, 5], [1, 1], [1, 1], [1, 0], [1, 0]):
            live = [i for i, n in enumerate(q_lens) if n]
            kv_lens = [done[i] + q_lens[i] for i in live]
            meta = build_metadata([q_lens[i] for i in live], kv_lens, [TABLES[i] for i in live], PAGE, logits="all")
            ids = torch.tensor([t for i in live for t in seqs[i][done[i]:done[i] + q_lens[i]]])
            logits = model.forward(ids, meta, cache)
            expect = torch.cat([want[i][done[i]:done[i] + q_lens[i]] for i in live])
            torch.testing.assert_close(logits.cpu(), expect, rtol=1e-4, atol=1e-4)
            for i in live:
                done[i] += q_lens[i]


def _gpu(cc, simulated=False):
    return hardware.DeviceInfo(index=0, kind="cuda", name="test GPU", compute_capability=cc, simulated=simulated)


def test_cpu_gets_torch_ops_with_the_reason():
    ops = dispatch.ops_for(hardware.cpu_device())
    assert ops.name == "torch" and not ops.eligibility.triton
    assert "CPU" in ops.eligibility.reason and "CUDA" in ops.eligibility.reason


def test_old_gpu_gets_torch_ops_though_triton_imports():
    """sm_61 (Pascal) with triton importable: torch ops, and no kernel is launched to find out."""
    assert dispatch.triton_missing() is None

    def probe(device):
        raise AssertionError("an ineligible device must not be probed")

    decision = dispatch.decide(_gpu((6, 1)), probe=probe)
    assert not decision.triton
    assert decision.reason == "Triton kernels need compute capability 7.0 or newer (device is sm_61)"


def test_failed_probe_gives_torch_ops_with_the_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def probe(device):
        raise RuntimeError("PTX assembly failed")

    decision = dispatch.decide(_gpu((8, 0)), probe=probe)
    assert not decision.triton and decision.probed
    assert decision.reason == "probe launch failed: RuntimeError: PTX assembly failed"
    ok = dispatch.decide(_gpu((8, 0)), probe=lambda d: "launched")
    assert ok.triton and ok.probed and ok.reason == "launched"


def test_decision_is_made_once_per_device_and_held(monkeypatch):
    calls = []
    monkeypatch.setattr(dispatch, "decide", lambda d: calls.append(d) or dispatch.Eligibility(True, "ok", True))
    dispatch.clear_cache()
    try:
        first = dispatch.ops_for(_gpu((9, 0)))
        second = dispatch.ops_for(_gpu((9, 0)))
    finally:
        dispatch.clear_cache()
    assert first.name == second.name == "triton" and len(calls) == 1


def test_interpreter_on_a_gpu_is_not_eligible(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    decision = dispatch.decide(_gpu((9, 0)), probe=lambda d: "launched")
    assert not decision.triton and "TRITON_INTERPRET=1" in decision.reason


def test_simulated_gpu_is_decided_by_capability():
    assert dispatch.decide(_gpu((7, 5), simulated=True)).triton
    assert not dispatch.decide(_gpu((6, 0), simulated=True)).triton


def test_attach_kernels_follows_the_decision(tiny):
    """The CPU's torch ops give linears no kernel hook; Triton ops give float16 linears the GEMV."""
    _, folder = tiny
    model, _ = load(folder, max_seq_len=16, page_size=PAGE, dtype="float32", devices=["cpu"])
    assert model.attach_kernels() == 0 and model.lm_head.kernel is None
    model.ops = {"cpu": dispatch.triton_ops()}
    model.layers[0].mlp.down.half()
    assert model.attach_kernels() == 1 and model.layers[0].mlp.down.kernel is not None


def test_triton_attention_rung_follows_the_decision(monkeypatch):
    """The triton attention rung asks the same decision: a failed probe launch leaves it unavailable,
    with that reason."""
    import lowgear.attention.triton as T

    monkeypatch.setattr(T, "triton_eligibility", lambda d: dispatch.decide(d, probe=_broken))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    result = T.TritonBackend().probe(_gpu((8, 0)))
    assert not result.available and result.reason == "probe launch failed: RuntimeError: no kernel image"


def _broken(device):
    raise RuntimeError("no kernel image")
