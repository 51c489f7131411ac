"""LOWGEAR_EMULATE_SM (ops/emulate.py): a newer GPU run as an sm_75 one.

On the CPU: the ptxas wrapper changes only the arch arguments (checked against a stand-in ptxas that
records what it was given), the variable's values and errors, and a CUDA device as the hardware layer
reports it under emulation (torch.cuda stood in for an H100). On a GPU (marked gpu): a subprocess
loads a model under LOWGEAR_EMULATE_SM=75 and shows that its Triton kernels were compiled for sm_75
(PTX target) yet run on the real GPU, with logits matching the CPU's float32 eager path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from lowgear.errors import ConfigError
from lowgear.ops import emulate
from lowgear.platform import hardware

FAKE_PTXAS = """#!{python}
import json, sys
if sys.argv[1:] == ["--version"]:
    print("ptxas: NVIDIA (R) Ptx optimizing assembler, Cuda compilation tools, release 12.8")
    sys.exit(0)
with open({log!r}, "w") as f:
    json.dump(sys.argv[1:], f)
"""


def test_the_wrapper_assembles_for_the_real_gpu_and_changes_nothing_else(tmp_path):
    real = tmp_path / "real-ptxas"
    log = tmp_path / "args.json"
    real.write_text(FAKE_PTXAS.format(python=sys.executable, log=str(log)))
    real.chmod(0o755)
    wrapper = emulate.ptxas_wrapper(str(real), "75", "90", folder=str(tmp_path))
    args = ["-lineinfo", "-v", "--gpu-name=sm_75", "/tmp/k.ptx", "-o", "/tmp/k.cubin"]
    subprocess.run([wrapper, *args], check=True)
    assert json.loads(log.read_text()) == ["-lineinfo", "-v", "--gpu-name=sm_90", "/tmp/k.ptx", "-o", "/tmp/k.cubin"]
    out = subprocess.run([wrapper, "--version"], check=True, capture_output=True, text=True).stdout
    assert "release 12.8" in out  # Triton reads the version through it


@pytest.mark.parametrize("value,cc", [("75", (7, 5)), ("sm_70", (7, 0)), ("7.5", (7, 5))])
def test_values(monkeypatch, value, cc):
    monkeypatch.setenv("LOWGEAR_EMULATE_SM", value)
    assert hardware.emulated_capability() == cc


def test_an_unknown_value_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("LOWGEAR_EMULATE_SM", "61")
    with pytest.raises(ConfigError, match="choose 70 .* or 75"):
        hardware.emulated_capability()


def _fake_h100(monkeypatch):
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 * 2**30,
                                  multi_processor_count=132, uuid=None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (70 * 2**30, 80 * 2**30))
    monkeypatch.setattr(hardware, "_nvml_table", lambda: [])
    monkeypatch.setattr(hardware, "_CACHE", {})  # the real cache comes back after the test
    monkeypatch.delenv("LOWGEAR_SIMULATE", raising=False)


def test_a_real_gpu_is_reported_as_the_emulated_one(monkeypatch):
    _fake_h100(monkeypatch)
    monkeypatch.setenv("LOWGEAR_EMULATE_SM", "75")
    gpu = hardware.list_devices(refresh=True)[0]
    assert gpu.compute_capability == (7, 5) and gpu.native_capability == (9, 0) and gpu.name.endswith("as sm_75")
    assert hardware.compute_capability(torch.device("cuda", 0)) == (7, 5)  # what routing and PDL read
    monkeypatch.delenv("LOWGEAR_EMULATE_SM")
    gpu = hardware.list_devices(refresh=True)[0]
    assert gpu.compute_capability == (9, 0) and gpu.native_capability is None


SCRIPT = r"""
import json, os, sys, glob
import torch
import lowgear as lg
from helpers import all_logits
path = sys.argv[1]
def load(device, dtype, rung):
    config = lg.Config(path)
    config.devices, config.dtype, config.attn_backend = [device], dtype, rung
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=512, page_size=16)
    model.load_autosplit(cache)
    return model, cache
ref = all_logits(*load("cpu", "float32", "eager"), list(range(3, 40)))
model, cache = load("0", "float16", "triton")
out = all_logits(model, cache, list(range(3, 40))).float().cpu()
from lowgear.ops import emulate, pdl
from triton import knobs
ptx = []
for f in glob.glob(os.path.join(knobs.cache.dir, "*", "*.ptx")):
    ptx.append(open(f).read())
print(json.dumps({"name": model.devices[0].name, "installed": emulate.installed(),
                  "rel": float((out - ref).norm() / ref.norm()),
                  "targets": sorted({l.split()[1] for p in ptx for l in p.splitlines() if l.startswith(".target")}),
                  "pdl": pdl.enabled(torch.device("cuda", 0))}))
"""


@pytest.mark.gpu
def test_on_a_gpu_kernels_are_built_for_sm75_and_agree(tmp_path):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs a CUDA GPU newer than sm_75")
    from lowgear.bench.synthetic import write_gguf

    path = write_gguf(tmp_path / "m.gguf", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=512, qtype="Q4_K", seed=3)
    env = dict(os.environ, LOWGEAR_EMULATE_SM="75", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"),
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", SCRIPT, path], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["name"].endswith("as sm_75") and r["installed"]["target"] == "75" and r["pdl"] is False
    assert r["targets"] == ["sm_75"], r["targets"]  # every kernel compiled for the old card
    assert r["rel"] < 1e-2
