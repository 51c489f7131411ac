"""lowgear doctor: "what will run on this T4 and how much context fits", on simulated machines."""

import argparse
import json

import pytest

from lowgear.cli import doctor
from lowgear.platform import hardware, placement
from lowgear.attention import select
from lowgear.config import Config
from lowgear.formats.spec import ModelSpec, TensorInfo

LLAMA3_8B = ModelSpec(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=8192, name="Llama-3-8B")
Q4_K_BYTES_PER_256 = 144


class StubSource:
    """A WeightSource with Llama-3-8B's tensors, stored as Q4_K (or F16), without any data."""

    def __init__(self, spec=LLAMA3_8B, qtype="Q4_K"):
        self.spec = spec
        h, kv, inter = spec.hidden_size, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
        shapes = {"embed": (spec.vocab_size, h), "norm": (h,), "lm_head": (spec.vocab_size, h)}
        for i in range(spec.num_layers):
            p = f"layers.{i}."
            shapes.update({p + "attn_norm": (h,), p + "ffn_norm": (h,), p + "q": (h, h), p + "k": (kv, h),
                           p + "v": (kv, h), p + "o": (h, h), p + "gate": (inter, h), p + "up": (inter, h),
                           p + "down": (h, inter)})
        self._info = {}
        for name, shape in shapes.items():
            numel = 1
            for n in shape:
                numel *= n
            t = qtype if len(shape) == 2 else "F32"
            nbytes = numel // 256 * Q4_K_BYTES_PER_256 if t == "Q4_K" else numel * (2 if t == "F16" else 4)
            self._info[name] = TensorInfo(t, shape, nbytes)

    def names(self):
        return list(self._info)

    def nbytes(self, name):
        return self._info[name].nbytes

    def info(self, name):
        return self._info[name]

    def get(self, name):
        raise AssertionError("doctor must not read tensor data")


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for var in ("LOWGEAR_SIMULATE", "LOWGEAR_NO_FLASH_ATTN", "LOWGEAR_NO_SDPA", "LOWGEAR_ATTN_BACKEND",
                "LOWGEAR_DEVICES", "LOWGEAR_DTYPE", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(var, raising=False)
    select.clear_cache()
    from lowgear.ops import dispatch

    dispatch.clear_cache()


def t4_report(monkeypatch, **kw):
    monkeypatch.setenv("LOWGEAR_SIMULATE", "t4")
    return doctor.collect(**kw)


def test_t4_rung_and_reasons(monkeypatch):
    report = t4_report(monkeypatch)
    gpu = report["attention"][0]
    assert gpu["device"] == "cuda:0" and gpu["dtype"] == "float16" and gpu["chosen"] == "sdpa"
    flash = next(x for x in gpu["log"] if x["name"] == "flash_attn")
    assert flash["status"] == "skipped" and flash["reason"] == "needs sm_80 (device is sm_75)"
    text = doctor.render(report)
    assert "float16 → sdpa" in text and "needs sm_80 (device is sm_75)" in text
    assert "SIMULATED" in text and "LOWGEAR_SIMULATE=t4" in text
    assert len(text.splitlines()) < 40


def test_batched_4bit_decode_line_says_tensor_cores_or_why_not(monkeypatch):
    from lowgear.ops.matmul import qmma

    monkeypatch.setattr(qmma, "_DISABLED", [])
    t4 = doctor.render(t4_report(monkeypatch))
    assert "4/8-bit batched decode: 4-16 rows on tensor cores (mma.sync built by NVRTC)" in t4
    monkeypatch.setenv("LOWGEAR_SIMULATE", "v100")
    v100 = doctor.render(doctor.collect())
    assert "4/8-bit batched decode: off: sm_75+ has the m16n8k8 mma" in v100
    monkeypatch.setenv("LOWGEAR_NO_QMMA", "1")
    assert "4/8-bit batched decode: off: LOWGEAR_NO_QMMA=1" in doctor.render(t4_report(monkeypatch))
    monkeypatch.delenv("LOWGEAR_NO_QMMA")
    monkeypatch.setattr(qmma, "_DISABLED", ["CUDA driver error in cuModuleLoadData: old driver"])
    assert "off: CUDA driver error in cuModuleLoadData: old driver" in doctor.render(t4_report(monkeypatch))


def test_the_plan_counts_q4_k_linears_as_a_gpu_holds_them():
    """A GPU rewrites Q4_K linears into GPTQ tensors at load: 4-bit codes and an fp16 scale and zero per 32 weights,
    5 bits a weight against the file's 4.5 (ops/matmul/repack.py). The layers and the head are planned at that; the
    embedding (looked up by row, not a matmul) and the norms as stored."""
    from lowgear.ops.matmul import repack

    per_layer, other, qtypes = placement.device_bytes(StubSource(), LLAMA3_8B, 2, repack.gpu_held_bytes)
    assert placement.device_bytes(StubSource(), LLAMA3_8B, 2)[0][0] == 218_103_808 * 9 // 16 + 2 * 4096 * 4  # as stored
    h, kv, inter = 4096, 1024, 14336
    linears = 2 * h * h + 2 * kv * h + 3 * inter * h
    assert per_layer == [linears * 5 // 8 + 2 * h * 4] * 32  # (two float32 norms)
    assert other == {"embed": 128256 * h // 256 * Q4_K_BYTES_PER_256, "lm_head": 128256 * h * 5 // 8, "norm": h * 4}
    assert qtypes["Q4_K"] == (32 * linears + 2 * 128256 * h) // 256 * Q4_K_BYTES_PER_256  # the file's bytes


def test_t4_fits_8b_q4_and_says_how_much(monkeypatch):
    report = t4_report(monkeypatch, config=Config(), source=StubSource())
    m = report["model"]
    assert m["quant_types"]["Q4_K"] > 4 * 10**9 and m["dtype"] == "float16"
    assert m["cache_bytes_per_token"] == 131072 and m["cache_bytes_per_1k_tokens"] == 131072000
    t4 = hardware.list_devices()[0]
    from lowgear.ops.matmul import repack

    per_layer, other, _ = placement.device_bytes(StubSource(), LLAMA3_8B, 2, repack.gpu_held_bytes)  # fp16, as held
    expected = placement.plan(LLAMA3_8B, per_layer, other, [t4], 2 * 8 * 128 * 2, "auto", 512 * 2**20).max_seq_len
    fit = m["fits"][0]
    assert fit["device"] == "cuda:0" and fit["tokens"] == expected and 50_000 < expected < 100_000
    assert m["placement"]["max_seq_len"] == 8192 and m["placement_error"] is None
    ceiling = m["decode_ceiling"]
    assert 50 < ceiling["tokens_per_s_empty"] < 80  # 320 GB/s over ~4.6 GB
    assert ceiling["tokens_per_s_full"] < ceiling["tokens_per_s_empty"]
    text = doctor.render(report)
    assert f"{expected:,} tokens of cache with --max-seq-len auto (the largest cache free device memory holds)" in text
    assert "decode ceiling" in text
    old = {(r["gpu"], r["batch"]): r for r in m["old_gpus"]}
    t4_1 = old[("Tesla T4", 1)]
    # 32 layers of 4-bit weights held at 5 bits (Q4_K as GPTQ) + a Q4_K head, at 0.8 x 320 GB/s: ~19 ms
    assert t4_1["bound"] == "memory" and 40 < t4_1["tokens_per_s"] < 60
    t4_16 = old[("Tesla T4", 16)]  # the codes read once through mma.sync: near batch 1's step
    assert next(iter(t4_16["ms_by_path"])) == "qmma" and t4_16["ms_per_step"] < 1.5 * t4_1["ms_per_step"]
    assert old[("Tesla V100-SXM2-16GB", 16)]["ms_by_path"]["dequant+cublas"] > 2 * old[("Tesla V100-SXM2-16GB", 1)]["ms_per_step"]
    assert "on old GPUs (predicted" in text and "Tesla V100-SXM2-16GB   batch 16" in text


def test_8b_fp16_needs_both_t4(monkeypatch):
    monkeypatch.setenv("LOWGEAR_SIMULATE", "t4,t4")
    report = doctor.collect(source=StubSource(qtype="F16"))
    m = report["model"]
    assert all(f["error"] and "missing" in f["error"] for f in m["fits"] if f["device"] != "cpu")
    placed = m["placement"]["devices"]
    assert [p["device"] for p in placed] == ["cuda:0", "cuda:1"]
    assert "cuda:1 (Tesla T4): layers" in doctor.render(report)


def test_unusable_device_is_explained(monkeypatch):
    monkeypatch.setenv("LOWGEAR_SIMULATE", "p100,arch=sm_75+sm_80+sm_90")
    report = doctor.collect()
    assert not report["devices"][0]["usable"]
    text = doctor.render(report)
    assert "UNUSABLE" in text and "cu126" in text
    assert report["selected_devices"] == ["cpu"]


def test_real_synthetic_gguf(monkeypatch, tmp_path):
    from lowgear.bench import synthetic

    path = synthetic.write_gguf(tmp_path / "tiny.gguf", hidden_size=64, num_layers=2, qtype="Q4_0")
    report = t4_report(monkeypatch, model_path=str(path))
    m = report["model"]
    assert m["format"] == "gguf" and m["arch"] == "llama" and "Q4_0" in m["quant_types"]
    assert m["fits"][0]["tokens"] > 1_000_000
    assert m["quantization"]["method"] == "GGUF" and m["quantization"]["types"]["Q4_0"] > 0.5
    assert "quantization: GGUF type mix by bytes: Q4_0" in doctor.render(report)
    assert m["quantization"]["type_bits_per_weight"] == {"Q4_0": 4.5}


@pytest.mark.parametrize("qtype, bpw", [("Q2_K", 2.625), ("Q3_K", 3.4375), ("IQ4_NL", 4.5), ("IQ4_XS", 4.25)])
def test_gguf_bits_per_weight(monkeypatch, tmp_path, qtype, bpw):
    from lowgear.bench import synthetic

    path = synthetic.write_gguf(tmp_path / "tiny.gguf", hidden_size=256, num_layers=1, intermediate_size=256,
                                qtype=qtype)
    report = t4_report(monkeypatch, model_path=str(path))
    q = report["model"]["quantization"]
    assert q["types"][qtype] > 0.5 and q["type_bits_per_weight"] == {qtype: bpw} and q["bits_per_weight"] == bpw
    assert f"{bpw:.2f} bits per weight over the packed tensors ({qtype} {bpw:.4g})" in doctor.render(report)


def test_exl2_folder_shows_bits_per_weight_and_the_plan(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    from test_exl2 import write_exl2_llama

    from lowgear.formats import HFSource

    _, folder = write_exl2_llama(tmp_path)
    report = t4_report(monkeypatch, model_path=str(folder))
    m = report["model"]
    q = m["quantization"]
    assert m["format"] == "hf" and q["method"] == "EXL2" and 2 < q["min"][1] < q["bits_per_weight"] < q["max"][1] < 9
    source = HFSource(folder)
    stored = sum(source.nbytes(n) for n in source.names() if source.info(n).qtype.startswith("EXL2_"))
    assert m["quant_types"]["EXL2"] == stored and m["quant_types"]["F16"] > 0
    assert m["placement"] is not None and m["fits"][0]["tokens"] > 0
    text = doctor.render(report)
    assert f"EXL2, {q['bits_per_weight']:.2f} bits per weight over the layers" in text
    assert f"head {q['head_bits_per_weight']:.2f}" in text and "head_bits 8" in text
    assert "tokens of cache with --max-seq-len auto" in text


def test_gptq_folder_shows_bits_and_group(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    from test_gptq import write_gptq_llama

    _, folder = write_gptq_llama(tmp_path, bits=4, group_size=32)
    report = t4_report(monkeypatch, model_path=str(folder))
    assert report["model"]["quantization"]["bits"] == 4
    assert "quantization: GPTQ 4-bit, group size 32, asymmetric, format gptq" in doctor.render(report)


def test_awq_folder_and_phi3_rope_are_said(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    from test_awq import write_awq_llama
    from test_model_phi3 import write_phi3

    _, folder = write_awq_llama(tmp_path)
    text = doctor.render(t4_report(monkeypatch, model_path=str(folder)))
    assert "quantization: AWQ 4-bit, group size 32, version gemm (run as GPTQ, repacked at load)" in text
    write_phi3(tmp_path / "phi3", "longrope-partial75-tied")
    text = doctor.render(t4_report(monkeypatch, model_path=str(tmp_path / "phi3")))
    assert "rope: rotates 12 of 16 dims a head; LongRoPE: long factors when the cache holds more than 160 tokens" in text


def test_cli_hooks_json(monkeypatch, capsys):
    monkeypatch.setenv("LOWGEAR_SIMULATE", "t4")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    doctor.add_parser(sub)
    args = parser.parse_args(["doctor", "--json", "--devices", "0"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["attention"][0]["chosen"] == "sdpa"
    assert report["selected_devices"] == ["cuda:0"]
    assert report["env"]["LOWGEAR_SIMULATE"]["value"] == "t4"


def test_bad_device_is_an_error_line(monkeypatch):
    monkeypatch.setenv("LOWGEAR_SIMULATE", "t4")
    report = doctor.collect(devices=["cuda:3"])
    assert any("no CUDA device" in e for e in report["errors"])
    assert "error: no CUDA device" in doctor.render(report)


def test_cpu_says_torch_ops_and_why(capsys):
    """No GPU: the CPU's ops are torch's, with the reason, in the text and in --json."""
    report = doctor.collect()
    cpu = next(d for d in report["devices"] if d["kind"] == "cpu")
    assert cpu["ops"] == {"name": "torch", "triton_kernels": False, "probed": False,
                          "reason": "the CPU runs the torch ops (Triton kernels need a CUDA GPU)"}
    assert "Triton kernels: no — the CPU runs the torch ops (Triton kernels need a CUDA GPU)" in doctor.render(report)
    parser = argparse.ArgumentParser()
    doctor.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["doctor", "--json"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert next(d for d in printed["devices"] if d["kind"] == "cpu")["ops"]["name"] == "torch"


def test_simulated_t4_is_decided_by_capability_and_a_p100_is_not_eligible(monkeypatch):
    """A simulated GPU runs nothing, so its decision comes from compute capability and triton's presence
    (as the attention rung's does), and says it was not probed; sm_60 is below Triton's floor."""
    from lowgear.ops import dispatch

    has_triton = dispatch.triton_missing() is None
    t4 = t4_report(monkeypatch)["devices"][0]
    assert t4["ops"]["triton_kernels"] == has_triton and not t4["ops"]["probed"]
    if has_triton:
        assert t4["ops"]["reason"] == "simulated sm_75: by compute capability and triton's presence, not probed"
        assert "Triton kernels: yes — simulated sm_75" in doctor.render(doctor.collect())
    monkeypatch.setenv("LOWGEAR_SIMULATE", "p100")
    report = doctor.collect()
    p100 = report["devices"][0]
    assert p100["ops"] == {"name": "torch", "triton_kernels": False, "probed": False,
                           "reason": "Triton kernels need compute capability 7.0 or newer (device is sm_60)"}
    text = doctor.render(report)
    assert "Triton kernels: no — Triton kernels need compute capability 7.0 or newer (device is sm_60)" in text


def test_cpu_auto_size_is_bounded_and_said(tmp_path, monkeypatch):
    """On a CPU doctor says what --max-seq-len auto takes and why: at most the model's context, and what a
    quarter of the available RAM holds (filling all free RAM once made a 135M model's cache 20 GB)."""
    from lowgear.bench.synthetic import write_gguf

    monkeypatch.setenv("LOWGEAR_SIMULATE", "cpu")
    path = write_gguf(tmp_path / "m.gguf", hidden_size=64, num_layers=1, num_heads=4, max_position_embeddings=4096)
    report = doctor.collect(Config(), str(path), ["cpu"])
    fit = report["model"]["fits"][0]
    assert fit["device"] == "cpu" and fit["tokens"] == 4096
    assert "the model's context" in fit["auto"] and "1/4 of available RAM" in fit["auto"]
    assert "4,096 tokens of cache with --max-seq-len auto (the model's context; a CPU cache is kept to 1/4" in doctor.render(report)


def test_cpu_weights_choice_is_said(tmp_path, monkeypatch):
    """doctor says whether a CPU unpacks the packed weights at load, why, and the memory they take."""
    from lowgear.bench.synthetic import write_gguf

    from lowgear.ops.matmul import cpu_int4

    monkeypatch.setenv("LOWGEAR_SIMULATE", "cpu")
    monkeypatch.delenv("LOWGEAR_CPU_WEIGHTS", raising=False)
    path = write_gguf(tmp_path / "m.gguf", hidden_size=64, num_layers=1, num_heads=4, qtype="Q4_1")
    four = doctor.collect(Config(), str(path), ["cpu"])["model"]["cpu_weights"]
    # q k v o gate up down: 7 (the head, rows not a multiple of 16, and the looked-up table are unpacked)
    assert four["int4"] and four["int4_layers"] == 7 and "4-bit layers stay 4-bit" in four["why"]
    assert "cpu      weights 4-bit layers as int4, the rest unpacked once at load" in doctor.render(
        doctor.collect(Config(), str(path), ["cpu"]))
    monkeypatch.setattr(cpu_int4, "sizer", lambda: None)  # a torch without the int4 kernel: the float rule
    w = doctor.collect(Config(), str(path), ["cpu"])["model"]["cpu_weights"]
    assert w["unpack"] and w["mode"] == "auto" and "fit in 1/2 of the RAM" in w["why"]
    assert w["held_bytes"] > w["unpacked_bytes"] > w["packed_bytes"] > 0
    text = doctor.render(doctor.collect(Config(), str(path), ["cpu"]))
    assert f"cpu      weights unpacked once at load: {doctor._gib(w['held_bytes'])} held — auto: the float weights" in text
    monkeypatch.setattr(placement, "_host_memory", lambda: w["unpacked_bytes"])  # not room for twice it
    w = doctor.collect(Config(), str(path), ["cpu"])["model"]["cpu_weights"]
    assert not w["unpack"] and "would not fit" in w["why"]
    monkeypatch.setenv("LOWGEAR_CPU_WEIGHTS", "packed")
    report = doctor.collect(Config(), str(path), ["cpu"])
    assert report["model"]["cpu_weights"]["mode"] == "packed"
    assert "weights packed (dequantized at every step)" in doctor.render(report)
    assert report["env"]["LOWGEAR_CPU_WEIGHTS"]["value"] == "packed"
