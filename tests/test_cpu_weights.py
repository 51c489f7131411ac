"""How packed weights live on a CPU (config.cpu_weights, platform.placement.cpu_weights, model/load.py):
unpacked once at load when they fit, else packed; the two paths agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowgear.ops.matmul import cpu_int4

import lowgear as lg
from lowgear.bench.synthetic import random_blocks
from lowgear.errors import ConfigError
from lowgear.formats import QUANT_FORMATS, dequantize
from lowgear.formats.spec import PackedTensor
from lowgear.model.linear import QuantLinear
from lowgear.platform import placement

from helpers import all_logits, load


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lowgear.bench.synthetic import write_gguf

    path = tmp_path_factory.mktemp("cpu_weights") / "tiny.gguf"
    write_gguf(path, arch="llama", hidden_size=96, num_layers=2, num_heads=6, num_kv_heads=2,
               intermediate_size=96, qtype="Q4_1", seed=7)
    return str(path)


def _linears(model):
    return [m for layer in model.layers for m in layer.modules() if isinstance(m, QuantLinear)] + [model.embed, model.lm_head]


@pytest.mark.parametrize("qtype", sorted(QUANT_FORMATS))
def test_unpack_matches_float64_reference(qtype):
    cols = 2 * QUANT_FORMATS[qtype].block_size
    data = random_blocks(np.random.default_rng(1), qtype, 37, cols, std=0.05)
    w = PackedTensor(qtype, torch.from_numpy(data), (37, cols))
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(2))
    packed = QuantLinear(w)
    lin = QuantLinear(w, chunk_elements=3 * cols).unpack_()  # bands of 3 rows: the band edges too
    assert not lin.packed and lin.weight.dtype == torch.float32 and lin.unpacked_from == qtype
    assert lin.nbytes == 37 * cols * 4 and "qweight" not in dict(lin.named_buffers())
    ref = dequantize(w, torch.float64)
    torch.testing.assert_close(lin.weight.double(), ref, rtol=0, atol=0)
    torch.testing.assert_close(lin(x).double(), x.double() @ ref.T, rtol=1e-5, atol=1e-5)
    # both float32, summed in another order ([in, out] storage against a transposed band): ~1e-6 apart
    torch.testing.assert_close(lin(x), packed(x), rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[3, 0], [36, 3]])
    torch.testing.assert_close(lin.lookup(ids), packed.lookup(ids), rtol=0, atol=0)


def test_the_settings(tiny, monkeypatch):
    monkeypatch.delenv("LOWGEAR_CPU_WEIGHTS", raising=False)  # conftest pins the float32 reference
    auto, _ = load(tiny, max_seq_len=256)  # 4-bit layers for the int4 kernel (test_cpu_int4.py), the table unpacked
    assert auto.cpu_weights.mode == "auto" and auto.cpu_weights.int4
    assert all(m.int4_cpu and m.qtype == "Q4_1" for m in _linears(auto)[:-2])
    assert not auto.embed.packed and auto.embed.unpacked_from == "Q4_1"
    monkeypatch.setattr(cpu_int4, "sizer", lambda: None)  # a torch without the int4 kernel: auto unpacks
    auto, _ = load(tiny, max_seq_len=256)
    assert auto.cpu_weights.mode == "auto" and auto.cpu_weights.unpack and not auto.cpu_weights.int4
    assert all(not m.packed and m.unpacked_from == "Q4_1" for m in _linears(auto))
    assert auto.lm_head is auto.embed or auto.lm_head.weight.dtype == torch.float32
    packed, _ = load(tiny, max_seq_len=256, cpu_weights="packed")
    assert not packed.cpu_weights.unpack and all(m.packed for m in _linears(packed))
    monkeypatch.setenv("LOWGEAR_CPU_WEIGHTS", "unpacked")
    forced, _ = load(tiny, max_seq_len=256)
    assert forced.cpu_weights.mode == "unpacked" and all(not m.packed for m in _linears(forced))
    cw = forced.cpu_weights
    assert cw.held_bytes == sum(p.numel() * p.element_size() for m in _linears(forced)[:-2] for p in m.parameters()) + \
        sum(m.nbytes for m in {id(m): m for m in _linears(forced)[-2:]}.values()) + \
        sum(ln.weight.numel() * 4 for layer in forced.layers for ln in (layer.attn_norm, layer.ffn_norm)) + \
        forced.norm.weight.numel() * 4
    monkeypatch.setenv("LOWGEAR_CPU_WEIGHTS", "sideways")
    with pytest.raises(ConfigError, match="sideways"):
        load(tiny, max_seq_len=256)


def test_auto_keeps_packed_when_ram_is_short(tiny, monkeypatch):
    monkeypatch.delenv("LOWGEAR_CPU_WEIGHTS", raising=False)
    monkeypatch.setattr(cpu_int4, "sizer", lambda: None)  # the float rule alone (4-bit layers aside)
    model, _ = load(tiny, max_seq_len=256)
    need = model.cpu_weights.unpacked_bytes
    cache = model.plan.max_seq_len * 2 * 2 * model.spec.num_kv_heads * model.spec.head_dim * 4  # K and V, 2 layers
    small_ram = dict(max_seq_len=256, reserve_memory_mb=0)  # a host with only this RAM (the placement sees it too)
    monkeypatch.setattr(placement, "_host_memory", lambda: 2 * need + cache)  # half of what the cache leaves: fits
    assert load(tiny, **small_ram)[0].cpu_weights.unpack
    monkeypatch.setattr(placement, "_host_memory", lambda: 2 * need + cache - 2)  # one byte short
    small, _ = load(tiny, **small_ram)
    assert not small.cpu_weights.unpack and "would not fit" in small.cpu_weights.why
    assert all(m.packed for m in _linears(small))
    monkeypatch.setenv("LOWGEAR_CPU_WEIGHTS", "unpacked")  # asked for: unpacked whatever the RAM
    assert load(tiny, **small_ram)[0].cpu_weights.unpack


def test_decision_counts_the_cache():
    class Source:  # one packed tensor of 1000 elements, one float norm
        def names(self):
            return ["layers.0.down", "norm"]

        def nbytes(self, name):
            return 600 if name != "norm" else 40

        def info(self, name):
            return type("I", (), {"qtype": "Q4_1" if name != "norm" else "F32",
                                  "shape": (10, 100) if name != "norm" else (10,)})

    fit = placement.cpu_weights(Source(), "auto", 4, cache_bytes=1000, ram=9000)
    assert fit.unpack and fit.unpacked_bytes == 4000 and fit.packed_bytes == 600 and fit.held_bytes == 4040
    tight = placement.cpu_weights(Source(), "auto", 4, cache_bytes=1001, ram=9000)
    assert not tight.unpack and tight.held_bytes == 640


def test_unpacked_logits_and_greedy_tokens_match_packed(tiny):
    results = {}
    for mode in ("packed", "unpacked"):
        model, cache = load(tiny, max_seq_len=512, cpu_weights=mode)
        ids = torch.randint(0, 200, (29,), generator=torch.Generator().manual_seed(2)).tolist()
        logits = all_logits(model, cache, ids)
        gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=lg.Tokenizer(model.config), max_batch_size=4)
        jobs = [lg.DynamicJob(ids[: 5 + 7 * i], max_new_tokens=20, gen_settings=lg.SamplerSettings.greedy(),
                              stop_conditions=[]) for i in range(3)]
        gen.enqueue(jobs)
        while not all(j.finished for j in jobs):
            gen.iterate()
        results[mode] = logits, [j.generated for j in jobs]
    torch.testing.assert_close(results["unpacked"][0], results["packed"][0], rtol=1e-5, atol=1e-5)
    assert results["unpacked"][1] == results["packed"][1]


def test_smollm2_unpacked_logits_match_packed(smollm2_path):
    """The embedded model, unpacked, against its packed path (the float64 reference is per linear above;
    transformers on the same file: test_model_hf.py, which now loads it unpacked)."""
    ids = [504, 3458, 282, 4649, 314, 1343, 30, 216]
    logits = {}
    for mode in ("unpacked", "packed"):
        model, cache = load(smollm2_path, max_seq_len=256, cpu_weights=mode)
        assert model.cpu_weights.unpack == (mode == "unpacked")
        logits[mode] = all_logits(model, cache, ids)
    torch.testing.assert_close(logits["unpacked"], logits["packed"], atol=1e-3, rtol=1e-4)
    assert (logits["unpacked"].argmax(-1) == logits["packed"].argmax(-1)).all()
