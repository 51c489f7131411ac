"""Graphed speculative decoding without a GPU: the static-buffer steps that CUDA graphs capture
(engine/graphs.DecodeGraphs), run uncaptured on the CPU on the triton rung (Triton's interpreter),
which reads only what a captured step reads.

- the staging of a check step (q_len = k + 1 tokens a row), written out by hand;
- one check step from the static buffers gives the logits of today's eager check step (a forward
  with each row's real tokens and build_metadata(logits=counts)) and writes the same K/V, padding
  only into the scratch page;
- through the generator (`use_graphs(captured=False)`), plain decoding (steps run ahead fed their
  tokens on the device), greedy speculation with n-gram lookup (in a
  batch with jobs that do not speculate) and with a draft model makes the tokens of plain decoding
  run alone on the eager rung (test_speculative.py's reference), and the static steps did run;
- sampled speculation with a draft gives the eager path's tokens for the same seeds (the acceptance
  test itself is test_speculative.py's chi-square tests).
"""

from __future__ import annotations

import pytest
import torch

import lowgear as lg
from lowgear.attention.metadata import build_metadata
from lowgear.engine.graphs import DecodeGraphs, DecodeRow, DecodeStaging
from test_speculative import greedy, reference, tiny_gguf  # noqa: F401  (fixtures)
from test_speculative import load_draft
from test_generator import make

K = 3  # proposals a check step holds
NEW = 14  # tokens per job (a prefix of the reference's 24: greedy)


def test_check_staging_by_hand():
    """Rows of 4, 1 and 2 tokens in a q_len 4 step of bucket 4: real tokens first in each row, then padding
    (token 0, position 0, the scratch page's first slot); kv_lens are what the kernels see: the row's
    real context plus its padding positions after it."""
    ps, width, scratch, q = 4, 5, 9, 4
    st = DecodeStaging(rows=4, width=width, page_size=ps, q_len=q)
    rows = [DecodeRow([5, 6, 7, 8], kv_len=10, pages=[3, 1, 2]),  # positions 6..9: page 1 offsets 2, 3; page 2 offsets 0, 1
            DecodeRow(11, kv_len=3, pages=[4]),  # a job that does not speculate: position 2
            DecodeRow([12, 13], kv_len=5, pages=[6, 7])]  # positions 3, 4
    st.fill(rows, bucket=4, scratch_page=scratch)
    ids, pos, slots, kv, tables = (t.tolist() for t in st.sections(st.host))
    s = scratch * ps
    assert ids == [5, 6, 7, 8, 11, 0, 0, 0, 12, 13, 0, 0, 0, 0, 0, 0]
    assert pos == [6, 7, 8, 9, 2, 0, 0, 0, 3, 4, 0, 0, 0, 0, 0, 0]
    assert slots == [6, 7, 8, 9, 4 * ps + 2, s, s, s, 6 * ps + 3, 7 * ps + 0, s, s, s, s, s, s]
    assert kv == [10, 6, 7, 4]
    assert tables == [[3, 1, 2, 0, 0], [4, 0, 0, 0, 0], [6, 7, 0, 0, 0], [scratch, 0, 0, 0, 0]]


def _prefill(model, cache, pages, n, seed):
    ids = torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    meta = build_metadata([n], [n], [pages], cache.page_size)
    model.forward(torch.tensor(ids), meta, cache)


def test_static_check_step_equals_the_eager_check(tiny_gguf):  # noqa: F811
    gen = make(tiny_gguf["target"], "triton", max_batch_size=4, speculate="ngram", num_draft_tokens=K)
    model, cache = gen.model, gen.cache
    ps = cache.page_size
    pages = cache.pool.allocate(6)
    # contexts of 20, 13 and 1 tokens; then rows of K + 1, 1 (no proposal) and 2 tokens, one padding row
    feeds = [[7, 8, 9, 10], [11], [12, 13]]
    starts = [20, 13, 1]
    tables = [pages[0:2], pages[2:4], pages[4:6]]
    for start, table in zip(starts, tables):
        _prefill(model, cache, table, start, seed=start)
    counts = [K + 1, 1, 2]
    q_lens = [len(f) for f in feeds]
    kv_lens = [s + n for s, n in zip(starts, q_lens)]
    meta = build_metadata(q_lens, kv_lens, tables, ps, logits=counts)
    want = model.forward(torch.tensor([t for f in feeds for t in f]), meta, cache)
    k_before = [t.clone() for t in cache.layer(0)]
    graphs = DecodeGraphs(model, cache, 4, cache.capacity_tokens, q_len=K + 1, captured=False)
    rows = [DecodeRow(f, kv, t) for f, kv, t in zip(feeds, kv_lens, tables)]
    got = graphs.run(rows, counts=counts)
    assert graphs.replays == 1 and graphs.scratch_page not in pages
    assert got.shape == want.shape == (sum(counts), model.spec.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # the same K/V at the real slots (written again); padding touched only the scratch page
    for before, after in zip(k_before, cache.layer(0)):
        keep = [p for p in range(before.shape[0]) if p != graphs.scratch_page]
        torch.testing.assert_close(after[keep], before[keep], rtol=1e-5, atol=1e-5)
    assert graphs.run(rows * 2, counts=counts * 2) is None  # 6 rows: more than the largest bucket
    assert graphs.run([DecodeRow([1] * (K + 2), 30, tables[0])]) is None  # more tokens than q_len
    graphs.release()
    cache.pool.release(pages)
    assert cache.pool.num_used == 0


def test_static_steps_need_a_capturable_rung(tiny_gguf):  # noqa: F811
    gen = make(tiny_gguf["target"], "eager", speculate="ngram")
    with pytest.raises(ValueError, match="eager attention rung cannot run static-buffer steps"):
        gen.use_graphs(captured=False)


def _static(gen):
    gen.use_graphs(captured=False)
    return gen


def test_plain_greedy_from_static_steps_equals_plain(tiny_gguf, reference):  # noqa: F811
    """The decode steps' own static path (q_len 1), with steps run ahead fed their tokens on the device."""
    ids, alone = reference
    gen = _static(make(tiny_gguf["target"], "triton", max_batch_size=3))
    jobs = greedy(gen, ids[:3], max_new=NEW)
    assert [j.generated for j in jobs] == [a[:NEW] for a in alone[:3]]
    assert gen.graphs.replays > 0 and gen.steps_ahead > 0 and gen.check_graphs is None


def test_ngram_greedy_from_static_steps_equals_plain(tiny_gguf, reference):  # noqa: F811
    ids, alone = reference
    n = 3
    gen = _static(make(tiny_gguf["target"], "triton", max_batch_size=n, speculate="ngram", num_draft_tokens=K))
    jobs = greedy(gen, ids[:n], max_new=NEW, speculate=[True, False, True])
    assert [j.generated for j in jobs] == [a[:NEW] for a in alone[:n]]
    assert gen.spec_accepted > 0 and jobs[1].spec_proposed == 0
    assert gen.check_graphs.replays > 0 and gen.graphs.replays > 0  # checks (mixed with a plain job) and decodes
    assert gen.graphed_steps == gen.check_graphs.replays + gen.graphs.replays


@pytest.mark.parametrize("draft", ["target", "draft"])
def test_draft_greedy_from_static_steps_equals_plain(tiny_gguf, reference, draft):  # noqa: F811
    """The target as its own draft (every proposal accepted: rows two behind catch up in a q_len 2 step)
    and a different model (few accepted)."""
    ids, alone = reference
    n = 2
    draft_model, draft_cache = load_draft(tiny_gguf[draft], "triton")
    gen = _static(make(tiny_gguf["target"], "triton", max_batch_size=n, draft_model=draft_model,
                       draft_cache=draft_cache, num_draft_tokens=K))
    jobs = greedy(gen, ids[:n], max_new=NEW)
    assert [j.generated for j in jobs] == [a[:NEW] for a in alone[:n]]
    assert draft_cache.pool.num_used == 0
    proposer = gen.proposer
    assert (gen.spec_accepted == gen.spec_proposed) == (draft == "target") and gen.spec_proposed > 0
    assert gen.check_graphs.replays > 0
    # the draft's steps: one eager step per job for its prompt, the rest from the static buffers
    assert proposer.graphed_steps > 0 and proposer.steps - proposer.graphed_steps <= n
    assert sum(g.replays for g in proposer.graphs.values()) == proposer.graphed_steps
    if draft == "target":  # every check accepted all: the draft's rows run two behind
        assert proposer.graphs[2].replays > 0


def test_sampled_draft_from_static_steps_equals_eager(tiny_gguf):  # noqa: F811
    ids = [[5, 9, 14, 3, 77, 21, 9, 14], [40, 2, 2, 31]]
    outs = {}
    for static in (False, True):
        draft_model, draft_cache = load_draft(tiny_gguf["draft"], "triton")
        gen = make(tiny_gguf["target"], "triton", max_batch_size=2, draft_model=draft_model,
                   draft_cache=draft_cache, num_draft_tokens=K)
        if static:
            _static(gen)
        settings = lg.Sampler.Settings(temperature=1.0, top_k=40, top_p=0.9)
        jobs = [lg.DynamicJob(p, max_new_tokens=12, gen_settings=settings, seed=7 + i) for i, p in enumerate(ids)]
        gen.enqueue(jobs)
        while any(not j.finished for j in jobs):
            gen.iterate()
        assert gen.spec_proposed > 0
        outs[static] = [j.generated for j in jobs]
        if static:
            assert gen.check_graphs.replays > 0 and gen.proposer.graphed_steps > 0
    assert outs[True] == outs[False]
