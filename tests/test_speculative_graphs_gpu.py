"""On a CUDA GPU: speculative decoding from captured graphs (the target's check steps, q_len k+1 a row,
and a draft model's decode steps) gives plain decoding's greedy tokens, for n-gram lookup and draft
models, in batches with jobs that do not speculate, and the graphs were replayed. Skipped without CUDA.

float16 sums differ between a (k+1)-token check and a decode step in the last bits, so where the tokens
of a speculating run and plain decoding part, the step must be a near tie: teacher-forced logits on a
cache of its own with a top-2 gap under 1% of the largest logit, both tokens among the top 2 (a wrong
page, slot or padding row would move logits by O(1) and give clear winners)."""

from __future__ import annotations

import pytest
import torch

import lowgear as lg
from helpers import all_logits
from lowgear.attention.metadata import build_metadata
from lowgear.engine.graphs import DecodeRow

pytestmark = pytest.mark.gpu
K = 3


def _load(path, max_seq_len=2048):
    config = lg.Config(path)
    config.devices, config.dtype, config.attn_backend = ["0"], "float16", "triton"
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=max_seq_len, page_size=16)
    model.load_autosplit(cache)
    return model, cache


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from lowgear.bench.synthetic import write_gguf

    root = tmp_path_factory.mktemp("spec_graphs")
    shape = dict(arch="llama", num_heads=8, num_kv_heads=2, qtype="Q4_0")
    return {"target": write_gguf(root / "t.gguf", hidden_size=512, num_layers=3, intermediate_size=1024, seed=5, **shape),
            "draft": write_gguf(root / "d.gguf", hidden_size=256, num_layers=1, intermediate_size=512, seed=6, **shape)}


@pytest.fixture(scope="module")
def target(files):
    model, cache = _load(files["target"])
    return model, cache, lg.Tokenizer(model.config)


def _prompts():
    g = torch.Generator().manual_seed(0)
    # tokens from a small range repeat, so n-gram lookups find proposals
    return [torch.randint(3, 3 + span, (n,), generator=g).tolist() for n, span in ((30, 8), (5, 200), (47, 12), (12, 6))]


def _greedy(gen, prompts, speculate, max_new=20):
    jobs = [lg.DynamicJob(p, max_new_tokens=max_new, gen_settings=lg.Sampler.Settings.greedy(), speculate=s)
            for p, s in zip(prompts, speculate)]
    gen.enqueue(jobs)
    while any(not j.finished for j in jobs):
        gen.iterate()
    assert gen.pool.num_used == 0  # the scratch page goes back when the generator is idle
    gen.pool.check()
    return [j.generated for j in jobs]


def _same_up_to_near_ties(model, prompts, want, got):
    cache = lg.Cache(model, max_seq_len=1024, page_size=16)
    cache.allocate()
    for prompt, a, b in zip(prompts, want, got):
        if a == b:
            continue
        p = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        logits = all_logits(model, cache, prompt + a[:p])[-1].float()
        top = logits.topk(2)
        gap = float(top.values[0] - top.values[1])
        assert gap < 0.01 * float(logits.abs().max()), (len(prompt), p, gap)
        assert {a[p], b[p]} <= set(top.indices.tolist())


def _plain(target, prompts):
    model, cache, tok = target
    gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tok, max_batch_size=4)
    assert gen.graphs is not None, gen.graphs_off_reason
    return _greedy(gen, prompts, [False] * len(prompts))


def test_graphed_check_step_logits_match_eager(target):
    model, cache, tok = target
    gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tok, max_batch_size=4, speculate="ngram",
                              num_draft_tokens=K)
    graphs = gen.check_graphs
    assert graphs is not None and graphs.captured and graphs.q_len == K + 1, gen.graphs_off_reason
    ps, dev = cache.page_size, model.layer_devices[0]
    pages = cache.pool.allocate(9)
    feeds, starts = [[7, 8, 9, 10], [11], [12, 13]], [20, 37, 1]
    tables = [pages[0:3], pages[3:6], pages[6:9]]
    for start, table in zip(starts, tables):  # the context each row attends to
        ids = torch.randint(3, 250, (start,), generator=torch.Generator().manual_seed(start)).tolist()
        model.forward(torch.tensor(ids), build_metadata([start], [start], [table], ps, device=dev), cache)
    counts = [K + 1, 1, 2]
    kv_lens = [s + len(f) for s, f in zip(starts, feeds)]
    got = graphs.run([DecodeRow(f, kv, t) for f, kv, t in zip(feeds, kv_lens, tables)], counts=counts).clone()
    assert graphs.replays == 1 and 4 in graphs._graphs  # bucket 4 (one padding row), captured and replayed
    assert graphs.scratch_page is not None and graphs.scratch_page not in pages
    meta = build_metadata([len(f) for f in feeds], kv_lens, tables, ps, device=dev, logits=counts)
    want = model.forward(torch.tensor([t for f in feeds for t in f]), meta, cache)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 2e-3, rel
    top = want.topk(2, dim=-1).values
    clear = (top[:, 0] - top[:, 1]) > 0.01 * want.abs().amax(-1)
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    cache.pool.release(pages)
    gen.graphs.release()
    gen.check_graphs.release()


def test_ngram_graphed_equals_plain_with_plain_jobs(target):
    model, cache, tok = target
    prompts = _prompts()
    want = _plain(target, prompts)
    gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tok, max_batch_size=4, speculate="ngram",
                              num_draft_tokens=K)
    gen.warmup()
    assert sorted(gen.check_graphs._graphs) == [1, 2, 4] and sorted(gen.graphs._graphs) == [1, 2, 4]
    replays = gen.check_graphs.replays
    got = _greedy(gen, prompts, [True, False, True, True])
    _same_up_to_near_ties(model, prompts, want, got)
    assert gen.spec_accepted > 0
    assert gen.check_graphs.replays > replays  # checks (with the plain job's row padded) replayed graphs
    gen.graphs.release()
    gen.check_graphs.release()


@pytest.mark.parametrize("draft", ["itself", "smaller"])
def test_draft_graphed_equals_plain_with_plain_jobs(target, files, draft):
    """The target as its own draft on a second cache (every proposal accepted, up to near ties: a draft's
    rows then run two tokens behind and catch up in a q_len 2 step) and a smaller random model."""
    model, cache, tok = target
    prompts = _prompts()
    want = _plain(target, prompts)
    draft_model, draft_cache = (model, lg.Cache(model, max_seq_len=2048, page_size=16)) if draft == "itself" \
        else _load(files["draft"])
    gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tok, max_batch_size=4, draft_model=draft_model,
                              draft_cache=draft_cache, num_draft_tokens=K)
    assert sorted(gen.proposer.graphs) == [1, 2], gen.draft_graphs_off_reason
    gen.warmup()
    assert all(sorted(g._graphs) == [1, 2, 4] and g.captured for g in gen.proposer.graphs.values())
    proposer = gen.proposer
    steps, graphed = proposer.steps, proposer.graphed_steps
    got = _greedy(gen, prompts, [True, True, False, True])
    _same_up_to_near_ties(model, prompts, want, got)
    assert draft_cache.pool.num_used == 0
    assert gen.spec_proposed > 0 and gen.check_graphs.replays > 0
    if draft == "itself":
        assert gen.spec_accepted > 0.8 * gen.spec_proposed and proposer.graphs[2].replays > 0
    # the draft's steps: eager for a prompt (a job's first proposal), else replayed
    assert proposer.graphed_steps - graphed > (proposer.steps - steps) / 2
    for graphs in (gen.graphs, gen.check_graphs, *proposer.graphs.values()):
        graphs.release()
