"""On a CUDA GPU: captured decode steps give the same greedy tokens as eager ones, through the
generator (batches that grow and shrink over buckets, sequences crossing page boundaries) and at the
logits level for one step. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import lowgear as lg
from lowgear.attention.metadata import build_metadata
from lowgear.engine.graphs import DecodeRow

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from lowgear.bench.synthetic import write_gguf

    path = write_gguf(tmp_path_factory.mktemp("graphs") / "m.gguf", arch="llama", hidden_size=512, num_layers=4,
                      num_heads=8, num_kv_heads=2, intermediate_size=1024, qtype="Q4_0", seed=5)
    config = lg.Config(path)
    config.devices, config.dtype, config.attn_backend = ["0"], "float16", "triton"
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=8192, page_size=16)
    model.load_autosplit(cache)
    return model, cache, lg.Tokenizer(config)


def _prompts(n):
    g = torch.Generator().manual_seed(0)
    lengths = (5, 40, 17, 1, 64, 9, 33, 100, 3, 15)
    return [torch.randint(3, 250, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def _run(gen, prompts, max_new):
    jobs = [lg.DynamicJob(p, max_new_tokens=max_new + 3 * i, gen_settings=lg.Sampler.Settings.greedy())
            for i, p in enumerate(prompts)]
    gen.enqueue(jobs[: len(jobs) // 2])
    steps = 0
    while any(not j.finished for j in jobs):
        gen.iterate()
        steps += 1
        if steps == 4:
            gen.enqueue(jobs[len(jobs) // 2 :])  # arrivals mid-generation: mixed steps, then bigger buckets
    assert gen.pool.num_used == 0  # the scratch page goes back when the generator is idle
    gen.pool.check()
    return [j.generated for j in jobs]


def test_graph_tokens_equal_eager(loaded):
    model, cache, tok = loaded
    assert model.selections["cuda:0"].backend.name == "triton"
    prompts = _prompts(10)
    eager = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tok, max_batch_size=8, cuda_graphs=False)
    assert eager.graphs is None
    want = _run(eager, prompts, max_new=24)
    graphed = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tok, max_batch_size=8)
    assert graphed.graphs is not None, graphed.graphs_off_reason
    graphed.warmup()
    assert sorted(graphed.graphs._graphs) == [1, 2, 4, 8]
    got = _run(graphed, prompts, max_new=24)
    graphed.graphs.release()
    assert got == want


def test_graph_step_logits_match_eager(loaded):
    model, cache, tok = loaded
    gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tok, max_batch_size=4)
    graphs = gen.graphs
    ps = cache.page_size
    pages = cache.pool.allocate(12)
    rows = [DecodeRow(11, 20, pages[0:2]), DecodeRow(12, 37, pages[2:5]), DecodeRow(13, 1, pages[5:6])]
    # Fill the context the rows attend to with an eager prefill of each sequence.
    for r in rows:
        if r.kv_len > 1:
            ids = torch.randint(3, 250, (r.kv_len - 1,), generator=torch.Generator().manual_seed(r.kv_len)).tolist()
            meta = build_metadata([len(ids)], [len(ids)], [r.pages], ps, device=model.layer_devices[0])
            model.forward(torch.tensor(ids), meta, cache)
    got = graphs.run(rows).clone()  # bucket 4, one padding row
    assert graphs.scratch_page is not None and graphs.scratch_page not in pages
    meta = build_metadata([1] * 3, [r.kv_len for r in rows], [r.pages for r in rows], ps, device=model.layer_devices[0])
    want = model.forward(torch.tensor([r.token for r in rows]), meta, cache)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 2e-3, rel
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    cache.pool.release(pages)
    graphs.release()


@pytest.fixture(scope="module")
def packed_ends(tmp_path_factory):
    """One model per GGUF block format, that format in every linear, the embedding and an untied head."""
    from lowgear.formats.blocks import QUANT_FORMATS
    from lowgear.bench.synthetic import write_gguf

    root = tmp_path_factory.mktemp("packed_ends")
    shape = dict(arch="llama", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512)
    return {q: write_gguf(root / f"m-{q}.gguf", qtype=q, seed=9, **shape) for q in QUANT_FORMATS}


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K",
                                   "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"])
def test_graphed_decode_with_packed_embedding_and_head(packed_ends, qtype):
    """A K-quant embedding once crashed capture (a host constant inside the dequantization)."""
    config = lg.Config(packed_ends[qtype])
    config.devices, config.dtype, config.attn_backend = ["0"], "float16", "triton"
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=2048, page_size=16)
    model.load_autosplit(cache)
    assert model.embed.qtype == qtype and model.lm_head.qtype == qtype and model.lm_head is not model.embed
    tok = lg.Tokenizer(config)
    prompts = _prompts(6)
    eager = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tok, max_batch_size=4, cuda_graphs=False)
    want = _run(eager, prompts, max_new=12)
    graphed = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tok, max_batch_size=4)
    assert graphed.graphs is not None, graphed.graphs_off_reason
    graphed.warmup()
    got = _run(graphed, prompts, max_new=12)
    graphed.graphs.release()
    assert got == want


def test_graphs_keep_their_rope_tables_when_the_model_serves_a_larger_cache(loaded):
    """The target as its own draft, on a cache larger than its own: the draft's first forward rebuilds the
    model's RoPE table for the larger cache, after the decode steps were captured reading the old one.
    The graphs hold that table (freed, its memory would be handed out again: here it would be, to
    tensors of its size filled with junk), so graphed steps after still make the eager tokens."""
    model, cache, tok = loaded
    prompts = _prompts(4)

    def greedy(gen, speculate):
        jobs = [lg.DynamicJob(p, max_new_tokens=16, gen_settings=lg.Sampler.Settings.greedy(), speculate=speculate)
                for p in prompts]
        gen.enqueue(jobs)
        while any(not j.finished for j in jobs):
            gen.iterate()
        return [j.generated for j in jobs]

    want = greedy(lg.DynamicGenerator(model=model, cache=cache, tokenizer=tok, max_batch_size=4, cuda_graphs=False), True)
    big = lg.Cache(model, max_seq_len=4 * cache.capacity_tokens, page_size=16)
    gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tok, max_batch_size=4, draft_model=model,
                              draft_cache=big, num_draft_tokens=3)
    assert gen.graphs is not None, gen.graphs_off_reason
    gen.warmup()  # captured with the table of `cache` (warm-up jobs are too short to propose)
    greedy(gen, True)  # speculating (its (k+1)-token checks may part from decode steps at near ties, float16)
    assert gen.spec_proposed > 0  # so the draft ran its forwards, on `big`: the model's table was rebuilt
    junk = [torch.full((cache.capacity_tokens, model.spec.head_dim // 2), 1e4, device="cuda") for _ in range(8)]
    assert greedy(gen, False) == want  # graphed decode steps only
    del junk
    gen.graphs.release()
