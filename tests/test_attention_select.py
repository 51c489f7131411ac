"""The ladder's decisions: the hardware table on simulated profiles, switches, forcing, broken and fake packages."""

import sys
import types

import pytest
import torch

from lowgear.platform import hardware
from lowgear.attention import select
from lowgear.attention.eager import attend_one
from lowgear.attention.flash_attn import FlashAttnBackend
from lowgear.attention.sdpa import SdpaBackend
from lowgear.config import Config, Switches
from lowgear.errors import BackendUnavailableError, DeviceError

NO_SWITCHES = Switches(False, False, False, False, None)


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for var in ("LOWGEAR_SIMULATE", "LOWGEAR_NO_FLASH_ATTN", "LOWGEAR_NO_XFORMERS", "LOWGEAR_NO_SDPA",
                "LOWGEAR_NO_TRITON", "LOWGEAR_ATTN_BACKEND", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(var, raising=False)
    select.clear_cache()
    yield
    select.clear_cache()


def simulated(monkeypatch, profile):
    monkeypatch.setenv("LOWGEAR_SIMULATE", profile)
    return hardware.list_devices()[0]


def fake_flash_attn(monkeypatch, broken=False, version="2.6.3"):
    """A `flash_attn` module computing the real function on the CPU (or failing like a wheel for another GPU)."""
    mod = types.ModuleType("flash_attn")
    mod.__version__ = version
    calls = []

    def fail(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_size):
        calls.append("varlen")
        assert causal
        window = None if window_size == (-1, -1) else window_size[0] + 1
        out = torch.empty_like(q)
        for s in range(len(cu_q) - 1):
            qs, qe, ks, ke = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
            out[qs:qe] = attend_one(q[qs:qe], k[ks:ke], v[ks:ke], softmax_scale, window)
        return out

    def with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal, window_size):
        calls.append("kvcache")
        page = k_cache.shape[1]
        window = None if window_size == (-1, -1) else window_size[0] + 1
        out = torch.empty_like(q)
        for b in range(q.shape[0]):
            n = int(cache_seqlens[b])
            pages = block_table[b, : -(-n // page)].long()
            k = k_cache[pages].flatten(0, 1)[:n]
            v = v_cache[pages].flatten(0, 1)[:n]
            out[b] = attend_one(q[b], k, v, softmax_scale, window)
        return out

    mod.flash_attn_varlen_func = fail if broken else varlen
    mod.flash_attn_with_kvcache = fail if broken else with_kvcache
    monkeypatch.setitem(sys.modules, "flash_attn", mod)
    return calls


def real_looking_gpu(cc=(8, 0)):
    """A CUDA device that is not simulated, so its probes run; tests point the probes' tensors at the CPU."""
    return hardware.DeviceInfo(
        index=0, kind="cuda", name="Test GPU", compute_capability=cc, total_memory=16 * 2**30,
        torch_arch_list=("sm_75", "sm_80", "sm_90"),
    )


@pytest.mark.parametrize(
    "profile,rung,dtype",
    [("t4", "sdpa", torch.float16), ("v100", "sdpa", torch.float16), ("p100", "sdpa", torch.float16),
     ("a10", "sdpa", torch.bfloat16), ("l4", "sdpa", torch.bfloat16), ("a100", "sdpa", torch.bfloat16),
     ("h100", "sdpa", torch.bfloat16)],
)
def test_table_without_flash_attn(monkeypatch, profile, rung, dtype):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setitem(sys.modules, "xformers", None)
    sel = select.select_backend(simulated(monkeypatch, profile), NO_SWITCHES)
    assert sel.name == rung and sel.dtype == dtype and not sel.probed
    flash = sel.decision("flash_attn")
    if profile in ("t4", "v100", "p100"):
        cc = {"t4": "75", "v100": "70", "p100": "60"}[profile]
        assert flash.status == "skipped" and flash.reason == f"needs sm_80 (device is sm_{cc})"
    else:
        assert flash.status == "unavailable" and "not installed" in flash.reason
    assert sel.decision("sdpa").status == "chosen"
    assert [d.status for d in sel.log[3:]] == ["not tried", "not tried"]


@pytest.mark.parametrize("profile", ["a100", "a100-40gb", "h100", "l4", "a10"])
def test_flash_attn_installed_is_chosen_on_ampere_and_newer(monkeypatch, profile):
    fake_flash_attn(monkeypatch)
    sel = select.select_backend(simulated(monkeypatch, profile), NO_SWITCHES)
    assert sel.name == "flash_attn"
    assert "by capability" in sel.decision("flash_attn").reason


@pytest.mark.parametrize("profile", ["t4", "v100"])
def test_flash_attn_installed_still_skipped_below_sm80(monkeypatch, profile):
    fake_flash_attn(monkeypatch)
    sel = select.select_backend(simulated(monkeypatch, profile), NO_SWITCHES)
    assert sel.name == "sdpa"
    assert sel.decision("flash_attn").reason.startswith("needs sm_80")


def test_cpu_probes_sdpa_for_real():
    sel = select.select_backend(hardware.cpu_device(), NO_SWITCHES)
    assert sel.name == "sdpa" and sel.probed and sel.dtype == torch.float32
    assert sel.decision("flash_attn").reason == "needs a CUDA GPU"
    assert "probe call ok" in sel.decision("sdpa").reason


def test_p100_without_sdpa_falls_past_triton_to_eager(monkeypatch):
    sw = Switches(False, False, True, False, None)
    sel = select.select_backend(simulated(monkeypatch, "p100"), sw)
    assert sel.name == "eager"
    assert sel.decision("sdpa").status == "disabled"
    assert sel.decision("triton").status == "skipped" and "sm_70" in sel.decision("triton").reason


def test_switch_from_environment(monkeypatch):
    fake_flash_attn(monkeypatch)
    monkeypatch.setenv("LOWGEAR_NO_FLASH_ATTN", "1")
    sel = select.select_backend(simulated(monkeypatch, "a100"), Config().effective_switches())
    d = sel.decision("flash_attn")
    assert d.status == "disabled" and d.reason == "disabled by config.no_flash_attn / LOWGEAR_NO_FLASH_ATTN"
    assert sel.name == "sdpa"


def test_forced_backend_that_cannot_run(monkeypatch):
    with pytest.raises(BackendUnavailableError, match=r"needs sm_80 \(device is sm_75\)"):
        select.select_backend(simulated(monkeypatch, "t4"), Switches(False, False, False, False, "flash_attn"))


def test_forced_backend_that_runs():
    sel = select.select_backend(hardware.cpu_device(), Switches(False, False, False, False, "eager"))
    assert sel.name == "eager"
    assert sel.decision("sdpa").status == "not tried"


def test_broken_flash_attn_wheel_is_unavailable_with_its_error(monkeypatch):
    fake_flash_attn(monkeypatch, broken=True)
    monkeypatch.setattr(FlashAttnBackend, "probe_device", torch.device("cpu"))
    monkeypatch.setattr(SdpaBackend, "probe_device", torch.device("cpu"))
    sel = select.select_backend(real_looking_gpu(), NO_SWITCHES, torch.float16)
    flash = sel.decision("flash_attn")
    assert flash.status == "unavailable"
    assert "no kernel image is available" in flash.reason
    assert sel.name == "sdpa" and sel.probed


def test_working_flash_attn_probe_uses_both_paths(monkeypatch):
    calls = fake_flash_attn(monkeypatch)
    monkeypatch.setattr(FlashAttnBackend, "probe_device", torch.device("cpu"))
    sel = select.select_backend(real_looking_gpu((9, 0)), NO_SWITCHES, torch.float16)
    assert sel.name == "flash_attn", sel.table()
    assert "paged via block_table" in sel.decision("flash_attn").reason
    assert calls == ["kvcache", "varlen"]


def test_old_flash_attn_is_not_paged(monkeypatch):
    calls = fake_flash_attn(monkeypatch, version="2.5.6")
    monkeypatch.setattr(FlashAttnBackend, "probe_device", torch.device("cpu"))
    sel = select.select_backend(real_looking_gpu(), NO_SWITCHES, torch.float16)
    assert sel.name == "flash_attn"
    assert "not paged-capable" in sel.decision("flash_attn").reason
    assert calls == ["varlen", "varlen"]


def test_flash_attn_below_sm80_is_not_imported(monkeypatch):
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    result = FlashAttnBackend().probe(real_looking_gpu((7, 5)))
    assert not result.available and result.reason == "needs sm_80 (device is sm_75)"
    assert "flash_attn" not in sys.modules


def test_results_are_cached(monkeypatch):
    dev = simulated(monkeypatch, "t4")
    assert select.select_backend(dev, NO_SWITCHES) is select.select_backend(dev, NO_SWITCHES)


def test_unusable_torch_build(monkeypatch):
    dev = simulated(monkeypatch, "p100,arch=sm_75+sm_80+sm_86+sm_90")
    with pytest.raises(DeviceError, match="cu126"):
        select.select_backend(dev, NO_SWITCHES)


def test_get_backend_unknown():
    with pytest.raises(BackendUnavailableError):
        select.get_backend("cudnn")


@pytest.mark.parametrize("profile", ["t4", "v100", "h100"])
def test_decode_steps_take_a_capturable_rung_below_sdpa(monkeypatch, profile):
    sel = select.select_backend(simulated(monkeypatch, profile), NO_SWITCHES)
    assert sel.name == "sdpa" and sel.backend_for(False).name == "sdpa"
    assert sel.decode_backend.name == "triton" and sel.backend_for(True).name == "triton"
    assert "sdpa cannot be captured" in sel.decode_reason


def test_decode_rung_respects_switches_forcing_and_the_cpu(monkeypatch):
    dev = simulated(monkeypatch, "h100")
    no_triton = select.select_backend(dev, Switches(False, False, False, True, None))
    assert no_triton.decode_backend.name == "sdpa" and no_triton.decode_reason == ""  # eager is not capturable either
    select.clear_cache()
    forced = select.select_backend(dev, Switches(False, False, False, False, "sdpa"))
    assert forced.decode_backend.name == "sdpa"  # a forced rung runs every step
    cpu = select.select_backend(hardware.cpu_device(), NO_SWITCHES)
    assert cpu.decode_backend is cpu.backend  # no graphs on the CPU
