"""Speculative decoding (engine/speculative.py).

Greedy: the output of every proposer, batched with jobs that do not speculate, is the plain greedy
output of the same model run alone (the reference of test_generator.py). Sampled: the acceptance test
on crafted logits, over many draws, emits tokens distributed as the target's distribution computed
here by hand (softmax, top-k); a chi-square test at the 0.1% level, which rejects the draft's own
distribution (so the test can fail)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lowgear as lg
from lowgear.engine.speculative import NgramProposer, ngram_proposal, verify
from lowgear.errors import ConfigError
from helpers import load
from test_generator import make, prompts


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from lowgear.bench.synthetic import write_gguf

    folder = tmp_path_factory.mktemp("spec")
    paths = {}
    for name, kwargs in {"target": dict(hidden_size=96, num_layers=2, num_heads=6, num_kv_heads=2, seed=3),
                         "draft": dict(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, seed=5),
                         "other_vocab": dict(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, seed=5,
                                             vocab_size=320)}.items():
        paths[name] = str(folder / f"{name}.gguf")
        write_gguf(paths[name], arch="llama", intermediate_size=kwargs["hidden_size"], qtype="Q8_0", **kwargs)
    return paths


def load_draft(path, rung: str = "eager"):
    """A model and its own cache on the CPU, attention on `rung`."""
    return load(path, max_seq_len=1024, page_size=16, attn_backend=rung, devices=["cpu"])


def greedy(gen, ids, max_new=24, speculate=None):
    speculate = speculate or [True] * len(ids)
    jobs = [lg.DynamicJob(p, max_new_tokens=max_new, gen_settings=lg.Sampler.Settings.greedy(), speculate=s)
            for p, s in zip(ids, speculate)]
    gen.enqueue(jobs)
    while any(not j.finished for j in jobs):
        gen.iterate()
    assert gen.pool.num_used == 0
    gen.pool.check()
    return jobs


@pytest.fixture(scope="module")
def reference(tiny_gguf):
    gen = make(tiny_gguf["target"], "eager", max_batch_size=1, paged=False)
    ids = prompts(5)
    return ids, [greedy(gen, [p])[0].generated for p in ids]


def test_ngram_proposal_by_hand():
    assert ngram_proposal([5, 6, 7, 8, 1, 5, 6], k=2) == [7, 8]  # "5 6" matched: what followed
    assert ngram_proposal([1, 2, 3, 9, 2, 3, 4, 2, 3], k=3) == [4, 2, 3]  # the latest occurrence wins
    assert ngram_proposal([1, 2, 3, 9, 2, 3, 4, 1, 2, 3], k=5) == [9, 2, 3, 4, 1]  # the longest n first
    assert ngram_proposal([1, 2, 3], k=4) == []
    assert ngram_proposal([4], k=4) == []


def test_ngram_index_answers_as_the_plain_search():
    """The proposer's growing index gives the plain search's answer at every length of a sequence."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        tokens = torch.randint(0, 4 + trial % 5, (60,), generator=g).tolist()
        proposer, job = NgramProposer(), object()
        for length in range(1, len(tokens) + 1, 1 + trial % 3):
            assert proposer.lookup(job, tokens[:length], 4) == ngram_proposal(tokens[:length], 4), (trial, length)


@pytest.mark.parametrize("rung", ["eager", "sdpa", "triton"])
def test_ngram_greedy_equals_plain_batched_with_plain_jobs(tiny_gguf, reference, rung):
    ids, alone = reference
    n = 3 if rung == "triton" else len(ids)  # the interpreter is slow
    gen = make(tiny_gguf["target"], rung, max_batch_size=n, speculate="ngram")
    jobs = greedy(gen, ids[:n], speculate=[True, False, True, True, False][:n])
    assert [j.generated for j in jobs] == alone[:n]
    assert gen.spec_proposed > 0 and gen.spec_accepted > 0  # random models repeat: lookups hit
    assert jobs[1].spec_proposed == 0


def test_draft_greedy_equals_plain(tiny_gguf, reference):
    ids, alone = reference
    # the target as its own draft accepts every proposal; a different model accepts few
    for path, all_accepted in ((tiny_gguf["target"], True), (tiny_gguf["draft"], False)):
        draft_model, draft_cache = load_draft(path)
        gen = make(tiny_gguf["target"], "sdpa", max_batch_size=3, max_chunk_size=20,
                   draft_model=draft_model, draft_cache=draft_cache, num_draft_tokens=3)
        results = []
        jobs = [lg.DynamicJob(p, max_new_tokens=24, gen_settings=lg.Sampler.Settings.greedy()) for p in ids]
        gen.enqueue(jobs)
        while any(not j.finished for j in jobs):
            results += gen.iterate()
        assert [j.generated for j in jobs] == alone
        assert draft_cache.pool.num_used == 0 and gen.pool.num_used == 0
        assert (gen.spec_accepted == gen.spec_proposed) == all_accepted and gen.spec_proposed > 0
        ends = [r for r in results if r["eos"]]
        assert all(0 <= r["acceptance_rate"] <= 1 for r in ends)
        assert sum(len(r["token_ids"]) for r in results) == 24 * len(ids)  # every token reported once
        if all_accepted:
            assert gen.steps < 24 * 2  # fewer target steps than tokens


def test_draft_with_another_vocabulary_is_one_clear_error(tiny_gguf):
    draft_model, draft_cache = load_draft(tiny_gguf["other_vocab"])
    with pytest.raises(ConfigError, match="vocabulary has 320 tokens but the target's has"):
        make(tiny_gguf["target"], "eager", draft_model=draft_model, draft_cache=draft_cache)
    with pytest.raises(ConfigError, match="not a proposer"):
        make(tiny_gguf["target"], "eager", speculate="lookahead")
    for k in (0, -3, 2.0, "4", True):
        with pytest.raises(ConfigError, match="num_draft_tokens must be a positive integer"):
            make(tiny_gguf["target"], "eager", speculate="ngram", num_draft_tokens=k)
    for n in (0, -1, 1.5):
        with pytest.raises(ConfigError, match="max_ngram must be a positive integer"):
            make(tiny_gguf["target"], "eager", speculate="ngram", max_ngram=n)
    gen = make(tiny_gguf["target"], "eager", use_ngram_draft=True, max_ngram=2)  # ExLlamaV2's names
    assert gen.proposer.max_n == 2


def test_draft_and_cache_mismatches_are_one_clear_error(tiny_gguf):
    """Each is one ConfigError when the generator is made, before any job could be harmed: n-gram lookup
    and a draft model together, a draft cache made for another model (the draft has 1 layer, the
    target 2: its forward would fail mid-step), the target's own cache as the draft's (the draft's pages
    would come out of the pool the running jobs' reservations count on)."""
    target, target_cache = load_draft(tiny_gguf["target"])
    draft, draft_cache = load_draft(tiny_gguf["draft"])
    tokenizer = lg.Tokenizer(target.config)

    def gen(**kwargs):
        return lg.DynamicGenerator(model=target, cache=target_cache, tokenizer=tokenizer, **kwargs)

    for kwargs in (dict(speculate="ngram"), dict(use_ngram_draft=True)):
        with pytest.raises(ConfigError, match="give either it or draft_model=, not both"):
            gen(draft_model=draft, draft_cache=draft_cache, **kwargs)
    with pytest.raises(ConfigError, match="draft_cache was made for another model"):
        gen(draft_model=draft, draft_cache=target_cache)
    with pytest.raises(ConfigError, match="the target's own cache"):
        gen(draft_model=target, draft_cache=target_cache)
    gen(draft_model=target, draft_cache=lg.Cache(target, max_seq_len=2048, page_size=16))  # its own draft: accepted
    assert target_cache.pool.num_used == 0


# ---------------------------------------------------------------- rejection sampling, by hand

LOGITS = [[1.0, 0.2, -0.5, 2.0, 0.0], [0.3, 0.3, 1.5, -1.0, 0.8], [-0.2, 1.1, 0.4, 0.5, 2.2]]
DRAFT = [[0.1, 0.4, 0.2, 0.2, 0.1], [0.5, 0.1, 0.1, 0.1, 0.2]]  # the proposer's q for d1, d2
TRIALS = 1200
CHI2_DF4_P001 = 18.467  # the chi-square quantile at 0.999 for 4 degrees of freedom


def softmax_top_k(row, top_k=0):
    """The target's distribution, written out: softmax at temperature 1, then the top_k kept."""
    e = np.exp(np.array(row) - max(row))
    if top_k:
        e[np.argsort(-np.array(row))[top_k:]] = 0
    return e / e.sum()


def chi2(counts, probs):
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs) if p > 0) + \
        (math.inf if any(c and not p for c, p in zip(counts, probs)) else 0.0)


def emitted(q_rows, draft_of, top_k):
    """Per position i: how often token t was the i-th emitted token (when i tokens were accepted before)."""
    settings = lg.Sampler.Settings(temperature=1.0, top_k=top_k, top_p=1.0)
    logits = torch.tensor(LOGITS)
    counts = np.zeros((3, 5), dtype=int)
    pick = np.random.default_rng(0)
    rng = torch.Generator().manual_seed(0)
    q = torch.tensor(q_rows) if q_rows is not None else None
    for _ in range(TRIALS):
        draft = draft_of(pick)
        out = verify(logits, draft, q, settings, [], rng)
        assert 1 <= len(out) <= 3 and out[:-1] == draft[: len(out) - 1]
        for i, t in enumerate(out):
            counts[i, t] += 1
    return counts


@pytest.mark.parametrize("top_k", [0, 3])
def test_rejection_sampling_with_a_draft_is_the_targets_distribution(top_k):
    counts = emitted(DRAFT, lambda g: [int(g.choice(5, p=DRAFT[0])), int(g.choice(5, p=DRAFT[1]))], top_k)
    for i in range(3):  # the i-th token, whenever one is emitted, is distributed as the target's at position i
        p = softmax_top_k(LOGITS[i], top_k)
        assert counts[i].sum() > 100
        assert chi2(counts[i], p) < CHI2_DF4_P001, (i, counts[i], p)
    assert chi2(counts[0], DRAFT[0]) > 10 * CHI2_DF4_P001  # the test tells the draft's distribution apart


def test_rejection_sampling_with_a_point_mass_is_the_targets_distribution():
    counts = emitted(None, lambda g: [3, 2], 0)  # an n-gram proposal: fixed tokens
    for i in range(3):
        assert chi2(counts[i], softmax_top_k(LOGITS[i])) < CHI2_DF4_P001, (i, counts[i])
    p = softmax_top_k(LOGITS[0])
    assert abs(counts[1].sum() / TRIALS - p[3]) < 4 * math.sqrt(p[3] * (1 - p[3]) / TRIALS)  # accepted with p(d1)


def test_greedy_check_by_hand():
    logits = torch.tensor(LOGITS)  # argmax per position: 3, 2, 4
    settings = lg.Sampler.Settings.greedy()
    assert verify(logits, [3, 2], None, settings, [], None) == [3, 2, 4]
    assert verify(logits, [3, 1], None, settings, [], None) == [3, 2]
    assert verify(logits, [0, 2], None, settings, [], None) == [3]
    bad = logits.clone()
    bad[1, 0] = float("nan")
    assert verify(bad, [3, 2], None, settings, [], None) is None


def test_smollm2_ngram_greedy_equals_plain(smollm2_path):
    config = lg.Config(smollm2_path)
    config.devices = ["cpu"]
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=512, page_size=64)
    model.load_autosplit(cache)
    tokenizer = lg.Tokenizer(config)
    prompt = "Count: one, two, three, four, five, six, seven, eight, nine, ten, one, two, three, four,"
    outs = {}
    for speculate in (None, "ngram"):
        gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer, speculate=speculate)
        outs[speculate] = gen.generate(prompt, max_new_tokens=10, gen_settings=lg.Sampler.Settings.greedy(),
                                       completion_only=True)
        if speculate:
            assert gen.spec_accepted > 0
    assert outs["ngram"] == outs[None]


def test_cli_draft_with_another_vocabulary_is_one_line(tiny_gguf):
    from test_cli import lowgear

    r = lowgear("generate", "hi", "-q", "-n", "2", "--max-seq-len", "256", "--draft-model", tiny_gguf["draft"])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lowgear: error:") and "vocabulary" in last and "tokenizer" in last, r.stderr


def test_server_speculates_over_an_int8_cache_and_counts_it():
    """`lowgear serve --speculate ngram --kv-cache-dtype int8`: a greedy completion, and /metrics's counters
    (Prometheus' text format read back by metrics.parse)."""
    from test_server import client, get_metrics, start_model_server, stop_model_server

    proc, base = start_model_server("--max-seq-len", "512", "--cache-size", "1024", "--speculate", "ngram",
                                    "--kv-cache-dtype", "int8")
    try:
        text = client(base).completions.create(model="any", prompt="a b c d e f a b c d e f a b c", max_tokens=8,
                                               temperature=0).choices[0].text
        assert text.strip()
        m = get_metrics(base)
        assert m["lowgear_spec_proposed_tokens_total"] >= m["lowgear_spec_accepted_tokens_total"] > 0
    finally:
        stop_model_server(proc)
