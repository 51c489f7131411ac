"""Programmatic dependent launch: when it is on, and what the kernels compiled with it contain.

The decision is tested with the capability lookup substituted; the kernels are compiled for sm_90
with no GPU present (as the old-GPU compile tests do) and their PTX read: with PDL each holds
griddepcontrol.wait (and .launch_dependents where its release mode puts one), without it none
(sm_70 / sm_75 cannot assemble them); the GEMVs issue their first weight load before the wait,
which is where their time is won; and no kernel copies anything
(cp.async, the software pipeliner's hoisted loads) before its wait: that is what made an early
release give other tokens on the H100 (pdl.py). On the H100 / H200 every GPU test runs with PDL on
(benchmarks/run_gpu_checks.sh).
"""

from __future__ import annotations

import pytest
import torch
from helpers import compiled_results

from lowgear.platform import env, hardware
from lowgear.ops import pdl
from lowgear.errors import ConfigError

pytest.importorskip("triton")


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(pdl, "_CAPABILITY", {})
    monkeypatch.setattr(pdl, "_SWITCHES", [])  # no loaded model's config in force
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name in ("LOWGEAR_NO_PDL", "LOWGEAR_PDL_RELEASE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("cc,want", [((9, 0), True), ((10, 0), True), ((8, 9), False), ((7, 5), False),
                                     ((7, 0), False), (None, False)])
def test_on_from_sm90_only(fresh, cc, want):
    fresh.setattr(hardware, "compute_capability", lambda device: cc)
    assert pdl.enabled(torch.device("cuda", 0)) is want
    assert pdl.launch(torch.device("cuda", 0), 1) == ({"PDL": pdl.WAIT, "launch_pdl": True} if want else {"PDL": 0})


def test_auto_release_waits_at_one_row_and_loops_above(fresh):
    """The default: WAIT for a one-row (batch-1 decode) launch, LOOP for more rows or an unknown count."""
    fresh.setattr(hardware, "compute_capability", lambda device: (9, 0))
    assert pdl.DEFAULT_RELEASE == pdl.AUTO
    dev = torch.device("cuda", 0)
    assert [pdl.launch(dev, rows)["PDL"] for rows in (1, 2, 8, 64, None)] == [pdl.WAIT] + [pdl.LOOP] * 4
    assert pdl.decision((9, 0))[1].endswith("release: auto = wait at one token row, loop above)")
    fresh.setenv("LOWGEAR_PDL_RELEASE", "auto")
    assert pdl.release_mode(1) == pdl.WAIT and pdl.release_mode(16) == pdl.LOOP
    fresh.setenv("LOWGEAR_PDL_RELEASE", "wait")
    assert pdl.decision((9, 0))[1].endswith("release: wait)")


def test_release_mode_from_the_environment(fresh):
    fresh.setattr(hardware, "compute_capability", lambda device: (9, 0))
    for name, mode in (("wait", pdl.WAIT), ("START", pdl.START), ("loop", pdl.LOOP)):
        fresh.setenv("LOWGEAR_PDL_RELEASE", name)
        for rows in (1, 16):  # a named mode holds at every row count
            assert pdl.launch(torch.device("cuda", 0), rows) == {"PDL": mode, "launch_pdl": True}
    fresh.setenv("LOWGEAR_PDL_RELEASE", "sometimes")
    with pytest.raises(ConfigError, match=r"PDL release 'sometimes' \(config.pdl_release or LOWGEAR_PDL_RELEASE\) is not one of auto, loop, wait, start"):
        pdl.launch(torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="is not one of"):
        pdl.decision((9, 0))
    assert not pdl.decision((8, 0))[0]  # below sm_90 the mode is never read


def test_off_on_the_cpu_under_the_interpreter_and_by_env(fresh):
    fresh.setattr(hardware, "compute_capability", lambda device: (9, 0))
    assert not pdl.enabled(torch.device("cpu"))
    fresh.setenv("LOWGEAR_NO_PDL", "1")
    assert not pdl.enabled(torch.device("cuda", 0))
    fresh.delenv("LOWGEAR_NO_PDL")
    fresh.setenv("TRITON_INTERPRET", "1")
    assert not pdl.enabled(torch.device("cuda", 0))
    assert "LOWGEAR_NO_PDL" in env.ENV_VARS


def test_doctor_says_how_decode_kernels_launch(fresh):
    from lowgear.cli import doctor

    fresh.setenv("LOWGEAR_SIMULATE", "h100,t4")
    report = doctor.collect()
    text = doctor.render(report)
    launches = [d["kernel_launch"] for d in report["devices"] if d["kind"] == "cuda"]
    assert launches[0].startswith("programmatic dependent launch") and "needs sm_90+" in launches[1]
    assert "decode kernels: programmatic dependent launch" in text
    fresh.setenv("LOWGEAR_NO_PDL", "1")
    assert "LOWGEAR_NO_PDL=1" in doctor.collect()["devices"][0]["kernel_launch"]


SCRIPT = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowgear.ops.attention import paged_decode as D
from lowgear.ops import act as kernels_act, norm as kernels_norm
from lowgear.ops.matmul import float_gemv as F, gptq_gemv as G, gptq_mma as MM

GEMV = {"x_ptr": "*fp16", "qw_ptr": "*i32", "zf_ptr": "*fp16", "sc_ptr": "*fp16", "perm_ptr": "*i32",
        "y_ptr": "*fp16", "part_ptr": "*fp32", "cnt_ptr": "*i32", "N": "i32", "ROWS": "i32",
        "rows_per_split": "i32", "group_rows": "i32", "stride_xm": "i32"}
NORM = {"x_ptr": "*fp16", "r_ptr": "*fp16", "w_ptr": "*fp32", "out_ptr": "*fp16", "H": "i32", "stride_x": "i32",
        "stride_r": "i32", "stride_o": "i32", "eps": "fp32"}
SILU = {"x_ptr": "*fp16", "out_ptr": "*fp16", "I": "i32", "stride_x": "i32", "stride_o": "i32"}
DEC = {"q_ptr": "*fp16", "k_cache_ptr": "*fp16", "v_cache_ptr": "*fp16", "block_tables_ptr": "*i32",
       "kv_lens_ptr": "*i32", "out_ptr": "*fp16", "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32",
       "scale_log2": "fp32", "softcap_log2": "fp32"}

def gemv(pdl):
    p = G.launch_params(4096, 4096, 4, G.gemv_tile_rows(4, 128, 4096), 1)
    return dict(M=1, M_PAD=1, BITS=4, BLOCK_R=p["BLOCK_R"], BLOCK_N=p["BLOCK_N"], HAS_PERM=False, S_CHUNK=4, PDL=pdl, F16X2=False,
                SPAN=0)

FGEMV = {"x_ptr": "*fp16", "w_ptr": "*fp16", "y_ptr": "*fp16", "part_ptr": "*fp32", "cnt_ptr": "*i32", "N": "i32",
         "K": "i32", "k_per_split": "i32", "stride_xm": "i32", "stride_wn": "i32"}

def float_gemv(pdl):
    p = F.launch_params(4096, 4096, 1)
    return dict(M=1, M_PAD=1, BLOCK_N=p["BLOCK_N"], BLOCK_K=p["BLOCK_K"], S_CHUNK=4, PDL=pdl)

MMA = {"x_ptr": "*fp16", "qw_ptr": "*i32", "zf_ptr": "*fp16", "sc_ptr": "*fp16", "perm_ptr": "*i32",
       "y_ptr": "*fp16", "part_ptr": "*fp32", "cnt_ptr": "*i32"}

def mma(pdl):
    p = MM.mma_launch_params(4096, 4096, 16, 4, 128)
    return dict(BITS=4, BLOCK_M=p["BLOCK_M"], BLOCK_N=p["BLOCK_N"], BLOCK_K=p["BLOCK_K"], HAS_PERM=False, S_CHUNK=4,
                PDL=pdl, FP16_MAGIC=True, WORDS=p["WORDS"])

def decode(pdl):
    return dict(GROUP=4, GROUP_P=16, HEAD_DIM=128, HEAD_DIM_P=128, PAGE_SIZE=256, BLOCK_N=D.DOT_BLOCK_N,
                NUM_SPLITS=4, DIRECT=False, WHILE_LOOP=False, DOT=True, PDL=pdl, SPLIT_D=0, D_VEC=8, SOFTCAP=False,
                QUANT=0)

CASES = [("gemv", G.gptq_gemv_kernel, GEMV, gemv), ("rms_norm", kernels_norm.rms_norm_kernel, NORM,
          lambda pdl: dict(HAS_RESIDUAL=True, BLOCK=4096, PDL=pdl)),
         ("silu_mul", kernels_act.silu_mul_kernel, SILU, lambda pdl: dict(BLOCK=1024, PDL=pdl, GELU=False)),
         ("decode", D.paged_decode_kernel, DEC, decode), ("float_gemv", F.float_gemv_kernel, FGEMV, float_gemv),
         ("mma", MM.gptq_mma_kernel, MMA, mma)]
MODES = {"gemv": (0, 1, 2, 3)}  # the others: off, LOOP, WAIT (auto's two)
out = {}
for name, kernel, args, consts in CASES:
    for flag in MODES.get(name, (0, 1, 2)):
        sig = {a: args.get(a, "i32") if a not in consts(flag) else "constexpr" for a in kernel.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(kernel.arg_names) if sig[a].startswith("*") or a in ("N", "ROWS", "stride_xm", "H", "I", "K", "stride_wn", "k_per_split")}
        options = {"num_warps": 2 if name == "gemv" else 4}
        if name == "mma":
            options["num_stages"] = 3  # as gptq_mma launches it: a pipelined loop
        c = triton.compile(ASTSource(kernel, sig, constexprs=consts(flag), attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=options)
        ptx = c.asm["ptx"]
        lines = ptx.splitlines()
        first = lambda pat: next((i for i, l in enumerate(lines) if re.search(pat, l)), None)
        fw = first(r"griddepcontrol\.wait")
        out[f"{name}/{int(flag)}"] = dict(wait=len(re.findall(r"griddepcontrol\.wait", ptx)),
                                          launch=len(re.findall(r"griddepcontrol\.launch_dependents", ptx)),
                                          first_wait=fw,
                                          first_launch=first(r"griddepcontrol\.launch_dependents"),
                                          last_fma=max((i for i, l in enumerate(lines) if "fma.rn" in l), default=None),
                                          first_v4=first(r"ld\.global(?:\.nc)?\.v4"),
                                          # the loop that holds the first tensor-core instruction
                                          dot_loop=max((i for i, l in enumerate(lines[:first(r"\bw?gmma|\bmma\.") or 0])
                                                        if "Loop Header" in l), default=None),
                                          first_prefetch=first(r"prefetch\.global\.L2"),
                                          prefetch=len(re.findall(r"prefetch\.global\.L2", ptx)),
                                          copies_before_wait=sum(bool(re.search(r"cp\.async|ld\.shared", l))
                                                                 for l in lines[:fw or 0]))
print("RESULTS" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled() -> dict:
    return compiled_results(SCRIPT, timeout=600)


@pytest.mark.parametrize("name", ["gemv", "rms_norm", "silu_mul", "decode", "float_gemv", "mma"])
def test_kernels_hold_griddepcontrol_only_with_pdl(compiled, name):
    on, off = compiled[f"{name}/1"], compiled[f"{name}/0"]
    assert on["wait"] >= 1, on
    # LOOP mode: the split-K GEMVs release their dependents after their main loop; the others at exit
    assert (on["launch"] >= 1) == (name in ("gemv", "float_gemv", "mma")), on
    assert off["wait"] == 0 and off["launch"] == 0 and off["prefetch"] == 0, off


@pytest.mark.parametrize("key", ["gemv/3"] + [f"{name}/{mode}" for name in ("gemv", "rms_norm", "silu_mul", "decode",
                                                                               "float_gemv", "mma") for mode in (1, 2)])
def test_nothing_is_copied_before_the_wait(compiled, key):
    """The previous kernel's output is read only after the wait, also by pipelined (hoisted) loads."""
    assert compiled[key]["copies_before_wait"] == 0, compiled[key]


def test_pipelined_kernel_waits_before_its_loop(compiled):
    for key in ("mma/1", "mma/2"):
        on = compiled[key]
        assert on["dot_loop"] is not None and on["first_wait"] < on["dot_loop"], on
        # so its first tile's codes are asked of L2 before the wait instead of loaded
        assert on["first_prefetch"] is not None and on["first_prefetch"] < on["first_wait"], on


@pytest.mark.parametrize("name", ["gemv", "float_gemv"])
def test_gemv_loads_weights_before_it_waits(compiled, name):
    on = compiled[f"{name}/1"]
    assert on["first_v4"] is not None and on["first_v4"] < on["first_wait"], on
    assert on["first_launch"] > on["last_fma"], on  # released after the main loop, not at the wait


def test_release_modes_put_the_release_at_the_wait(compiled):
    for key in ("gemv/2", "mma/2"):  # WAIT: right after it (the instruction after)
        on = compiled[key]
        assert on["first_launch"] > on["first_wait"] and on["first_launch"] < on["last_fma"], on
    for key in ("rms_norm/2", "silu_mul/2", "decode/2", "float_gemv/2"):  # auto's batch-1 launches
        on = compiled[key]
        assert on["wait"] >= 1 and on["launch"] >= 1 and on["first_launch"] > on["first_wait"], on
        if on["last_fma"] is not None and on["last_fma"] > on["first_wait"]:
            assert on["first_launch"] < on["last_fma"], on  # before the work, not at exit
    on = compiled["gemv/3"]  # START: just before it
    assert on["first_launch"] < on["first_wait"], on


def test_config_switches_reach_the_launches(fresh, tmp_path):
    """config.no_pdl / config.pdl_release, handed over at model load, decide the launches as the
    environment variables do; a later load with a default config goes back to the defaults."""
    from lowgear.bench.synthetic import write_gguf
    from lowgear.config import Config

    fresh.setattr(hardware, "compute_capability", lambda device: (9, 0))
    dev = torch.device("cuda", 0)
    config = Config(write_gguf(tmp_path / "m.gguf", hidden_size=64, num_layers=1, num_heads=4))
    config.pdl_release = "start"
    pdl.configure(config)
    assert pdl.launch(dev, 1) == {"PDL": pdl.START, "launch_pdl": True}
    config.no_pdl = True
    pdl.configure(config)
    assert pdl.launch(dev, 1) == {"PDL": 0} and "config.no_pdl" in pdl.decision((9, 0))[1]
    config.no_pdl, config.pdl_release = False, "often"
    with pytest.raises(ConfigError, match="'often'"):
        pdl.configure(config)
    import lowgear as lg

    model = lg.Model(config_default := Config(config.model_dir))
    model.load_autosplit(lg.Cache(model, max_seq_len=64, page_size=16))
    assert (config_default.pdl_off(), config_default.pdl_release_name()) == (False, "auto")
    assert pdl.launch(dev, 1) == {"PDL": pdl.WAIT, "launch_pdl": True}
