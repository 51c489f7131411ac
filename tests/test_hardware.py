"""Device facts: simulated profiles, CUDA_DEVICE_ORDER / CUDA_VISIBLE_DEVICES, device ids, arch lists, dtype policy."""

import pytest
import torch

from lowgear.platform import dtypes, hardware
from lowgear.errors import ConfigError, DeviceError


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for var in ("LOWGEAR_SIMULATE", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(var, raising=False)


def sim(monkeypatch, spec, order=None, visible=None):
    monkeypatch.setenv("LOWGEAR_SIMULATE", spec)
    if order:
        monkeypatch.setenv("CUDA_DEVICE_ORDER", order)
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    return hardware.list_devices()


def test_cpu_always_listed(monkeypatch):
    devs = sim(monkeypatch, "cpu")
    assert [d.kind for d in devs] == ["cpu"]
    assert hardware.default_devices()[0].kind == "cpu"


@pytest.mark.parametrize(
    "profile,cc,bandwidth",
    [("t4", (7, 5), 320e9), ("v100", (7, 0), 900e9), ("v100-32gb", (7, 0), 900e9), ("a10", (8, 6), 600e9),
     ("l4", (8, 9), 300e9), ("a100", (8, 0), 2039e9), ("a100-40gb", (8, 0), 1555e9), ("h100", (9, 0), 3350e9),
     ("h200", (9, 0), 4800e9), ("p100", (6, 0), 732e9)],
)
def test_profiles(monkeypatch, profile, cc, bandwidth):
    gpu = sim(monkeypatch, profile)[0]
    assert gpu.simulated and gpu.kind == "cuda" and gpu.compute_capability == cc
    assert gpu.bandwidth == pytest.approx(bandwidth)
    assert gpu.uuid.startswith("GPU-") and gpu.pci_bus_id.startswith("00000000:")
    assert hardware.profile_for_name(gpu.name) == profile


def test_memory_figures(monkeypatch):
    devs = {d.profile: d for d in sim(monkeypatch, "t4,v100-32gb,a100-40gb,a100")[:-1]}
    assert 14 * 2**30 < devs["t4"].total_memory < 16 * 10**9
    assert 30 * 2**30 < devs["v100-32gb"].total_memory < 32 * 2**30
    assert 39 * 2**30 < devs["a100-40gb"].total_memory < 40 * 2**30
    assert 79 * 2**30 < devs["a100"].total_memory < 80 * 2**30


def test_unknown_profile(monkeypatch):
    monkeypatch.setenv("LOWGEAR_SIMULATE", "rtx9090")
    with pytest.raises(DeviceError, match="unknown profile"):
        hardware.list_devices()


def test_fastest_first_vs_pci_order(monkeypatch):
    # T4 listed first, so it sits on the lower PCI bus; CUDA's default order puts the A100 first.
    fast = sim(monkeypatch, "t4,a100")
    assert [d.profile for d in fast[:2]] == ["a100", "t4"]
    assert [d.nvml_index for d in fast[:2]] == [1, 0]
    pci = sim(monkeypatch, "t4,a100", order="PCI_BUS_ID")
    assert [d.profile for d in pci[:2]] == ["t4", "a100"]
    assert [d.index for d in pci[:2]] == [0, 1]
    # the same physical card keeps its UUID and bus id in both numberings
    assert fast[0].uuid == pci[1].uuid and fast[0].pci_bus_id == pci[1].pci_bus_id


def test_explicit_bus_placement(monkeypatch):
    devs = sim(monkeypatch, "t4@0a,a100@03", order="PCI_BUS_ID")
    assert [d.profile for d in devs[:2]] == ["a100", "t4"]
    assert devs[1].pci_bus_id == "00000000:0A:00.0"


@pytest.mark.parametrize("order", ["FASTEST_FIRST", "PCI_BUS_ID"])
def test_resolve_by_uuid_and_pci_whichever_order(monkeypatch, order):
    devs = sim(monkeypatch, "t4,a100", order=order)
    a100 = next(d for d in devs if d.profile == "a100")
    t4 = next(d for d in devs if d.profile == "t4")
    bus = a100.pci_bus_id  # "00000000:02:00.0"
    for text in (bus, bus[4:], bus[9:], bus.lower(), "cuda:%d" % a100.index, str(a100.index), a100.uuid, a100.uuid[:12]):
        assert hardware.resolve_devices([text]) == [a100], text
    assert hardware.resolve_devices(["01:00.0", "cpu"]) == [t4, hardware.cpu_device()]
    assert hardware.resolve_devices("0,1")[0].index == 0


def test_resolve_errors(monkeypatch):
    devs = sim(monkeypatch, "t4,t4")
    with pytest.raises(DeviceError, match="no CUDA device 'cuda:5'.*Available"):
        hardware.resolve_devices(["cuda:5"])
    with pytest.raises(DeviceError, match="no visible GPU at PCI bus id"):
        hardware.resolve_devices(["0000:07:00.0"])
    with pytest.raises(DeviceError, match="no visible GPU with UUID"):
        hardware.resolve_devices(["GPU-ffffffff"])
    with pytest.raises(DeviceError, match="ambiguous"):
        hardware.resolve_devices(["GPU-"])
    with pytest.raises(DeviceError, match="cannot read device"):
        hardware.resolve_devices(["the fast one"])
    with pytest.raises(DeviceError, match="named twice"):
        hardware.resolve_devices(["0", devs[0].uuid])


def test_visible_devices(monkeypatch):
    devs = sim(monkeypatch, "t4,a100,v100", visible="2,0")
    # CUDA_VISIBLE_DEVICES indexes count in CUDA's order (fastest first: a100, v100, t4)
    assert [(d.index, d.profile) for d in devs[:-1]] == [(0, "t4"), (1, "a100")]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert len(hardware.list_devices()) == 4
    uuid_v100 = next(d.uuid for d in hardware.list_devices() if d.profile == "v100")
    only = sim(monkeypatch, "t4,a100,v100", visible=uuid_v100[:13])
    assert [d.profile for d in only[:-1]] == ["v100"]
    assert [d.kind for d in sim(monkeypatch, "t4,a100", visible="")] == ["cpu"]


def test_arch_lists(monkeypatch):
    assert hardware.arch_list_covers(["sm_80"], (8, 6))
    assert not hardware.arch_list_covers(["sm_86"], (8, 0))
    assert hardware.arch_list_covers(["compute_70"], (7, 5))
    assert not hardware.arch_list_covers(["sm_90a"], (9, 1))
    assert not hardware.arch_list_covers(["sm_75", "sm_80"], (6, 0))
    p100 = sim(monkeypatch, "p100")[0]
    assert hardware.torch_arch_supported(p100)  # the default simulated build is a CUDA 12.6 one
    p100 = sim(monkeypatch, "p100,arch=sm_75+sm_80+sm_90")[0]
    assert not hardware.torch_arch_supported(p100)
    assert "cu126" in hardware.torch_build_hint(p100)
    with pytest.raises(DeviceError, match="cannot be used.*cu126"):
        hardware.resolve_devices(["0"])
    assert hardware.default_devices() == [hardware.cpu_device()]


def test_pci_parsing():
    assert hardware.parse_pci_bus_id("00000000:04:00.0") == (0, 4, 0, 0)
    assert hardware.parse_pci_bus_id("0000:0A:00.0") == hardware.parse_pci_bus_id("0a:00.0")
    assert hardware.parse_pci_bus_id("4") is None
    assert hardware.normalize_uuid("58B8b3a6-0000") == "GPU-58b8b3a6-0000"


# ---------------------------------------------------------------- dtype policy (dtypes.py)


def test_dtype_policy(monkeypatch):
    devs = {d.profile or "cpu": d for d in sim(monkeypatch, "t4,v100,p100,a100,h100,l4")}
    assert dtypes.choose_dtype(devs["cpu"]) == torch.float32
    for p in ("t4", "v100", "p100"):
        assert dtypes.choose_dtype(devs[p]) == torch.float16
    for p in ("a100", "h100", "l4"):
        assert dtypes.choose_dtype(devs[p]) == torch.bfloat16
    assert dtypes.choose_dtype(devs["a100"], "float16") == torch.float16
    assert dtypes.choose_dtype(devs["t4"], "fp32") == torch.float32
    with pytest.raises(ConfigError, match="bfloat16 needs .* sm_75.*float16"):
        dtypes.choose_dtype(devs["t4"], "bfloat16")
    with pytest.raises(ConfigError, match="unknown dtype"):
        dtypes.choose_dtype(devs["t4"], "int8")
    assert dtypes.common_dtype([devs["a100"], devs["t4"]]) == torch.float16


def test_check_finite():
    x = torch.tensor([1.0, 60000.0], dtype=torch.float16)
    assert dtypes.check_finite(x, "layer 0") is x
    with pytest.raises(dtypes.NonFiniteError, match="layer 3 mlp.*float32.*sm_80"):
        dtypes.check_finite(x * 2, "layer 3 mlp")
