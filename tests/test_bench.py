"""`lowgear bench` end to end on the CPU with the tiny preset: the JSON's structure and its arithmetic.

No timed assertions: the figures of a shared CPU are noise. What is checked is that every figure
carries its device and shape, that roofline and FLOP percentages are computed from this run's own
measurements, and that each ratio to transformers divides two figures of the same run.
"""

import json
import math

import pytest
import torch

from lowgear.bench import command as bench
from lowgear.cli.main import make_parser
from lowgear.model.linear import QuantLinear
from lowgear.formats.gptq import GPTQWeight, dequantize_gptq


def _run(tmp_path, *extra):
    args = make_parser().parse_args(["bench", "--preset", "tiny", "--device", "cpu", "--quick", "--out", str(tmp_path), *extra])
    assert args.func(args) == 0
    with open(tmp_path / "bench.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("transformers")
    return _run(tmp_path_factory.mktemp("bench"))


def test_report_structure(report, tmp_path_factory):
    assert report["schema"] == 1
    assert report["device"]["device"] == "cpu"
    m = report["measured"]
    assert m["bandwidth_bytes_per_s"] > 0 and m["matmul_flops_per_s"] > 0
    kinds = {(r["engine"], r["kind"]) for r in report["results"]}
    assert {("lowgear", "decode"), ("lowgear", "prefill"), ("lowgear", "generate"),
            ("transformers", "decode"), ("transformers", "prefill")} <= kinds
    for r in report["results"]:
        for key in ("device", "shape", "dtype", "batch", "context", "rung", "quant", "ms_per_step"):
            assert key in r, (key, r)
    assert {m["quant"] for m in report["models"]} == {"float", "q4_0"}
    assert report["plot"] in ("bench.png", None)



def test_each_figure_has_its_wall_time(report):
    """Every figure records the wall seconds it took (its warmup and first-use kernel builds included): at least
    its timed steps (two or more steps of the median's length: --quick times three decode steps, two prefill)."""
    created = [r for r in report["results"] if r["kind"] in ("decode", "prefill")]
    assert created
    for r in created:
        assert r["wall_seconds"] >= 2 * r["ms_per_step"] / 1e3 * 0.99 - 1e-4, r


def test_every_rung_accounted_for(report):
    rungs = {r["rung"] for r in report["rungs"]}
    assert {"sdpa", "eager", bench.T4_RUNG} <= rungs
    t4 = [r for r in report["rungs"] if r["rung"] == bench.T4_RUNG and r["available"]]
    assert t4 and all(r["dtype"] == "float16" for r in t4)
    ran = {(r["rung"], r["quant"]) for r in report["results"] if r["engine"] == "lowgear"}
    for entry in report["rungs"]:
        assert ((entry["rung"], entry["quant"]) in ran) == entry["available"], entry
    flash = next(r for r in report["rungs"] if r["rung"] == "flash_attn")
    assert not flash["available"] and flash["reason"]


def test_figures_use_this_runs_ceilings(report):
    bw, peak = report["measured"]["bandwidth_bytes_per_s"], report["measured"]["matmul_flops_per_s"]
    spec = bench.PRESETS["tiny"]
    for r in report["results"]:
        if r["engine"] == "lowgear" and r["kind"] == "decode":
            elt = 2 if r["dtype"] == "float16" else 4
            kv = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * elt * r["batch"] * (r["context"] + 1)
            assert r["kv_bytes_per_step"] == kv
            assert r["bytes_per_step"] == r["weight_bytes_per_step"] + kv
            assert math.isclose(r["roofline_ms"], r["bytes_per_step"] / bw * 1e3)
            assert math.isclose(r["pct_roofline"], 100 * r["roofline_ms"] / r["ms_per_step"])
            assert math.isclose(r["tokens_per_s"], r["batch"] / (r["ms_per_step"] / 1e3))
        if r["kind"] == "prefill":
            assert r["flops"] == bench.prefill_flops(spec, r["context"])
            assert math.isclose(r["pct_peak_flops"], 100 * r["flops"] / (r["ms_per_step"] / 1e3) / peak)
        if r["kind"] == "generate":
            assert r["ttft_ms"] > 0


def test_ratios_come_from_the_same_run(report):
    peers = [r for r in report["results"] if r["engine"] == "transformers"]
    compared = [r for r in report["results"] if "vs_transformers" in r]
    assert compared
    for r in compared:
        same = [p for p in peers if (p["model"], p["kind"], p["batch"], p["context"]) == (r["model"], r["kind"], r["batch"], r["context"])]
        best = max(same, key=lambda p: p["tokens_per_s"])
        vs = r["vs_transformers"]
        assert vs["tokens_per_s"] == best["tokens_per_s"] and vs["attn"] == best["rung"]
        assert math.isclose(vs["ratio"], r["tokens_per_s"] / best["tokens_per_s"])


def test_weight_bytes_skip_the_embedding_table():
    spec = bench.PRESETS["llama3-8b"]
    source = bench.RandomSource(spec, None, torch.device("meta"), torch.float16)
    total = sum(source.nbytes(n) for n in source.names())
    assert abs(total / 1e9 - 16.06) < 0.05  # Llama-3-8B in float16
    packed = bench.RandomSource(spec, "Q4_0", torch.device("meta"), torch.float16)
    linear = sum(packed.nbytes(n) for n in packed.names() if n.startswith("layers.") and packed.info(n).qtype == "Q4_0")
    assert packed.info("layers.0.q").nbytes == 4096 * 4096 // 32 * 18
    assert linear < total / 3


def test_plot_only_redraws(report, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "again.json"
    path.write_text(json.dumps(report))
    args = make_parser().parse_args(["bench", "--plot-only", str(path)])
    assert args.func(args) == 0
    assert (tmp_path / "again.png").stat().st_size > 0


def test_generator_step_seconds_times_decode_steps_and_leaves_the_cache_empty():
    import lowgear as lg
    from lowgear.bench.models import _NullTokenizer, generator_step_seconds, synthetic_config

    spec = bench.PRESETS["tiny"]
    model = lg.Model(synthetic_config(spec, "float", torch.device("cpu"), torch.float32, "cpu"))
    cache = lg.Cache(model, max_seq_len=512, page_size=16)
    model.load_autosplit(cache)
    gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=_NullTokenizer(spec.vocab_size), max_batch_size=4)
    tokens: list = []
    seconds = generator_step_seconds(gen, batch=3, context=20, vocab=spec.vocab_size, steps=5, tokens_out=tokens)
    assert 0 < seconds < 10
    assert gen.num_remaining_jobs() == 0 and gen.pool.num_used == 0
    # a token from the prefill, two untimed steps and the five timed ones, for each of the 3 jobs
    assert len(tokens) == 3 and all(len(t) >= 8 for t in tokens), tokens
    assert all(0 <= x < spec.vocab_size for t in tokens for x in t)


def test_gptq4_source_builds_gptq_layers_whose_bytes_match_info():
    """--quant gptq4: GPTQ tensors of the preset's shapes (4-bit, groups of 128), as many bytes as
    info() says, loaded as GPTQ QuantLinears that run (torch path on the CPU)."""
    spec = bench.PRESETS["llama3-8b"]
    source = bench.RandomSource(spec, bench.QUANTS["gptq4"], torch.device("meta"), torch.float16)
    assert source.info("layers.0.q").nbytes == 4096 * 4096 // 2 + 32 * 4096 * 2 + 32 * 4096 // 2
    tiny = bench.PRESETS["tiny"]
    src = bench.RandomSource(tiny, bench.QUANTS["gptq4"], torch.device("cpu"), torch.float32)
    w = src.get("layers.0.gate")
    assert isinstance(w, GPTQWeight) and (w.bits, w.group_size, w.g_idx) == (4, 128, None)
    assert w.nbytes == src.info("layers.0.gate").nbytes
    lin = QuantLinear(w)
    x = torch.randn(2, lin.in_features)
    torch.testing.assert_close(lin(x), x @ dequantize_gptq(w).t(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quant", ["q4_0", "q8_0", "q4_k", "q6_k"])
def test_random_source_packed_weights_have_the_float_spread(quant):
    """Each synthetic block format decodes (by formats.dequant) to finite weights of std ~0.02, like the
    float ones, so its timing runs real arithmetic on sane values; rows narrower than a block multiple
    stay float."""
    import dataclasses

    from lowgear.formats.dequant import dequantize
    from lowgear.formats.spec import PackedTensor

    spec = dataclasses.replace(bench.PRESETS["tiny"], hidden_size=256, intermediate_size=512, head_dim=64)
    src = bench.RandomSource(spec, bench.QUANTS[quant], torch.device("cpu"), torch.float32)
    for name in ("layers.0.q", "layers.0.down", "lm_head"):
        t = src.get(name)
        assert isinstance(t, PackedTensor) and t.qtype == bench.QUANTS[quant]
        assert t.data.shape[1] == src.info(name).nbytes // t.shape[0]
        w = dequantize(t)
        assert torch.isfinite(w).all() and 0.015 < w.std().item() < 0.025, (name, w.std())
    narrow = bench.RandomSource(bench.PRESETS["tiny"], bench.QUANTS[quant], torch.device("cpu"), torch.float32)
    # the tiny preset's 64-wide rows are a multiple of 32 (Q4_0, Q8_0 blocks), not of 256 (K blocks)
    assert isinstance(narrow.get("layers.0.q"), PackedTensor) == (quant in ("q4_0", "q8_0"))


def test_step_timer_times_every_row_when_prefill_takes_many_chunks():
    """generator_step_seconds at a context many chunks long: jobs whose prompt ends first decode during the
    others' chunks, so with max_new_tokens = steps + 8 they ended before the timing did and the 'batch 16'
    steps timed fewer rows (8k-token KV runs read well above the memory roofline). Every job must run
    through the timed steps: each one's tokens go past the untimed and timed steps."""
    import lowgear as lg
    from lowgear.bench.models import PRESETS, _NullTokenizer, generator_step_seconds, synthetic_model

    spec = PRESETS["tiny"]
    model, cache = synthetic_model(spec, "float", torch.device("cpu"), 4096, 16, backend="eager",
                                   dtype=torch.float32, label="cpu")
    gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=_NullTokenizer(spec.vocab_size), max_batch_size=6,
                              max_chunk_size=32)
    out: list = []
    steps = 3
    generator_step_seconds(gen, 6, 96, spec.vocab_size, steps, seed=1, tokens_out=out)  # 18 prefill chunks
    assert len(out) == 6
    # the last job's first token, 2 untimed steps, `steps` timed ones (a run-ahead step may add one)
    assert all(len(t) >= 1 + 2 + steps for t in out), [len(t) for t in out]
    # the first job decoded through the others' prefill and still ran: more tokens than steps + 8
    assert max(len(t) for t in out) > steps + 8, [len(t) for t in out]
    assert gen.num_remaining_jobs() == 0
