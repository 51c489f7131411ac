"""attention/xformers.py on the CPU, through stand-in `xformers` packages.

No xformers wheel runs here, and the one on a GPU it was tried on imports but its CUDA ops fail. So the
stand-in comes in two kinds: one whose `memory_efficient_attention` computes the documented function
(block-diagonal sequences, causal from the bottom right, an optional local window) in float64 from
the mask's sequence lengths alone, which checks lowgear's packing, GQA and mask against the eager
rung; and one that imports fine but raises from its operator as a wheel without working CUDA ops
does, which the probe must report as unavailable with that error, so the ladder moves on to sdpa.
"""

import sys
import types

import pytest
import torch

from lowgear.platform import hardware
from lowgear.attention import select
from lowgear.attention.eager import EagerBackend
from lowgear.attention.sdpa import SdpaBackend, probe_case
from lowgear.attention.xformers import XformersBackend
from lowgear.config import Switches

NO_SWITCHES = Switches(False, False, False, False, None)
NO_OPERATOR = ("No operator found for `memory_efficient_attention_forward` with inputs: query : shape=(1, 5, 4, 64) "
               "(torch.float16) `cutlassF-pt` is not supported because: xFormers wasn't build with CUDA support")


class BottomRightMask:
    """What lowgear builds: sequences back to back, each causal from its bottom right, maybe local."""

    def __init__(self, q_seqlen, kv_seqlen, window=None):
        self.q_seqlen, self.kv_seqlen, self.window = list(q_seqlen), list(kv_seqlen), window

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen):
        return cls(q_seqlen, kv_seqlen)

    def make_local_attention_from_bottomright(self, window):
        return BottomRightMask(self.q_seqlen, self.kv_seqlen, window)


def memory_efficient_attention(q, k, v, attn_bias, scale):
    """[1, T, H, D] each (H equal: xformers takes no GQA), the mask above; float64, one sequence at a time."""
    out = torch.empty_like(q)
    qo = ko = 0
    for ql, kl in zip(attn_bias.q_seqlen, attn_bias.kv_seqlen):
        qs, ks, vs = (t[0, a:a + n].double() for t, a, n in ((q, qo, ql), (k, ko, kl), (v, ko, kl)))
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        i = torch.arange(ql)[:, None] + (kl - ql)  # the query's position among the keys
        j = torch.arange(kl)[None, :]
        keep = j <= i
        if attn_bias.window is not None:
            keep &= j > i - attn_bias.window
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        out[0, qo:qo + ql] = torch.einsum("hqk,khd->qhd", probs, vs).to(q.dtype)
        qo, ko = qo + ql, ko + kl
    return out


def fake_xformers(monkeypatch, broken=False):
    calls = []

    def op(q, k, v, attn_bias=None, scale=None):
        calls.append(q.shape)
        if broken:
            raise NotImplementedError(NO_OPERATOR)
        return memory_efficient_attention(q, k, v, attn_bias, scale)

    pkg, ops, fmha, bias = (types.ModuleType(n) for n in
                            ("xformers", "xformers.ops", "xformers.ops.fmha", "xformers.ops.fmha.attn_bias"))
    ops.memory_efficient_attention = op
    bias.BlockDiagonalCausalFromBottomRightMask = BottomRightMask
    pkg.ops, ops.fmha, fmha.attn_bias = ops, fmha, bias
    for mod in (pkg, ops, fmha, bias):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return calls


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for var in ("LOWGEAR_SIMULATE", "LOWGEAR_NO_FLASH_ATTN", "LOWGEAR_NO_XFORMERS", "LOWGEAR_ATTN_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed: the ladder starts at xformers
    monkeypatch.setattr(XformersBackend, "probe_device", torch.device("cpu"))
    monkeypatch.setattr(SdpaBackend, "probe_device", torch.device("cpu"))
    select.clear_cache()
    yield
    select.clear_cache()


def gpu(cc=(7, 5)):
    """A CUDA device that is not simulated, so its probes run (their tensors on the CPU)."""
    return hardware.DeviceInfo(index=0, kind="cuda", name="Test GPU", compute_capability=cc,
                               total_memory=16 * 2**30, torch_arch_list=("sm_70", "sm_75", "sm_80", "sm_90"))


def test_installed_but_broken_wheel_is_unavailable_with_its_error(monkeypatch):
    calls = fake_xformers(monkeypatch, broken=True)
    sel = select.select_backend(gpu(), NO_SWITCHES, torch.float16)
    xf = sel.decision("xformers")
    assert xf.status == "unavailable" and calls  # it imported, and its operator was really called
    assert "No operator found" in xf.reason and "memory_efficient_attention" in xf.reason
    assert sel.name == "sdpa" and sel.probed


def test_working_xformers_is_chosen_below_sm80(monkeypatch):
    calls = fake_xformers(monkeypatch)
    sel = select.select_backend(gpu(), NO_SWITCHES, torch.float16)
    assert sel.name == "xformers", sel.table()
    assert "probe call ok" in sel.decision("xformers").reason and calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [None, 5])
def test_attend_matches_the_eager_rung(monkeypatch, dtype, window):
    """Prefill and decode rows of unequal lengths, GQA 2:1, sequences across page boundaries."""
    fake_xformers(monkeypatch)
    case = probe_case(torch.device("cpu"), dtype, page_size=8)
    got = XformersBackend().attend(case.q, case.k_cache, case.v_cache, case.meta, case.scale, window)
    want = EagerBackend().attend(case.q.double(), case.k_cache.double(), case.v_cache.double(), case.meta,
                                 case.scale, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert torch.allclose(got.double(), want, atol=tol, rtol=tol)


def test_switched_off_xformers_is_not_imported(monkeypatch):
    for name in ("xformers", "xformers.ops", "xformers.ops.fmha", "xformers.ops.fmha.attn_bias"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setenv("LOWGEAR_NO_XFORMERS", "1")
    from lowgear.config import Config

    sel = select.select_backend(gpu(), Config().effective_switches(), torch.float16)
    assert sel.decision("xformers").status == "disabled" and sel.name == "sdpa"
    assert "xformers.ops" not in sys.modules
