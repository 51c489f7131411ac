"""The DynamicGenerator's scheduling and page accounting under random traffic, with a stub model.

The model is replaced by one that returns seeded random logits (the scheduler never looks inside
it), so hypothesis can drive the real generator through >= 10,000 random operations: enqueue jobs
whose prompts share prefixes, cancel running or queued jobs, step, run out of pages. After every
operation the page pool's invariants hold and every page's reference count equals the number of
running jobs that hold it; at the end every page is free or cached.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import lowgear as lg
from helpers import stub_config
from lowgear.cache.pages import PagePool
from lowgear.errors import ContextLengthError

VOCAB = 40
PAGE = 4


class StubModel:
    loaded = True

    def __init__(self):
        self.layer_devices = [torch.device("cpu")]
        self.config = stub_config(max_input_len=16, max_seq_len=None, no_cuda_graphs=True)
        self.calls = 0

    def forward(self, ids, meta, cache):
        assert ids.shape[0] == meta.num_tokens
        # every new token's slot lies in one of its own sequence's pages
        start = 0
        for s, q in enumerate(meta.q_lens_host):
            pages = set(meta.block_tables[s].tolist())
            for slot in meta.slot_mapping[start : start + q].tolist():
                assert slot // meta.page_size in pages
            start += q
        self.calls += 1
        g = torch.Generator().manual_seed(self.calls)
        return torch.randn(len(meta.logit_indices), VOCAB, generator=g)


class StubTokenizer:
    stop_token_ids = {0}

    def token_bytes_table(self, decode_special_tokens=False):
        return [bytes([97 + i % 26]) for i in range(VOCAB)]


def make_generator(num_pages=24, max_batch_size=4):
    cache = SimpleNamespace(pool=PagePool(num_pages, PAGE), page_size=PAGE, capacity_tokens=num_pages * PAGE,
                            allocated=True, contiguous=False)
    return lg.DynamicGenerator(StubModel(), cache, StubTokenizer(), max_batch_size=max_batch_size, cuda_graphs=False)


PREFIXES = [[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 20, 21, 22, 23], [30, 31, 32, 33, 34, 35, 36, 37]]


class GeneratorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.gen = make_generator()
        self.jobs: list[lg.DynamicJob] = []

    @rule(prefix=st.sampled_from(range(len(PREFIXES))), cut=st.integers(1, 8),
          tail=st.lists(st.integers(1, VOCAB - 1), max_size=10), new=st.integers(1, 12),
          sample=st.booleans(), seed=st.integers(0, 3))
    def enqueue(self, prefix, cut, tail, new, sample, seed):
        settings_ = lg.Sampler.Settings(temperature=1.0, top_k=0, top_p=1.0) if sample else lg.Sampler.Settings.greedy()
        job = lg.DynamicJob(PREFIXES[prefix][:cut] + tail, max_new_tokens=new, gen_settings=settings_,
                            stop_conditions=[0], seed=seed)
        self.gen.enqueue(job)
        self.jobs.append(job)

    @rule(extra=st.integers(1, 30))
    def enqueue_too_large(self, extra):
        before = (len(self.gen.queue), self.gen.pool.num_used)
        with pytest.raises(ContextLengthError):
            self.gen.enqueue(lg.DynamicJob([1] * (self.gen.cache.capacity_tokens + extra), max_new_tokens=1))
        assert (len(self.gen.queue), self.gen.pool.num_used) == before

    @precondition(lambda self: self.jobs)
    @rule(i=st.integers(0, 1000))
    def cancel(self, i):
        job = self.jobs[i % len(self.jobs)]
        self.gen.cancel(job)
        assert job.finished and job.pages is None

    @rule(n=st.integers(1, 3))
    def step(self, n):
        for _ in range(n):
            for r in self.gen.iterate():
                job = r["job"]
                assert len(job.generated) <= job.max_new_tokens
                if r["eos"]:
                    assert r["eos_reason"] in ("stop_token", "max_new_tokens", "cancelled")

    @invariant()
    def pages_consistent(self):
        pool = self.gen.pool
        pool.check()
        holders: dict[int, int] = {}
        for job in self.gen.running:
            for p in job.pages:
                holders[p] = holders.get(p, 0) + 1
        for p in range(pool.num_pages):
            assert pool.refcount(p) == holders.get(p, 0)
        assert len(self.gen.running) <= self.gen.max_batch_size

    def teardown(self):
        for _ in range(500):
            if not self.gen.num_remaining_jobs():
                break
            self.gen.iterate()
        assert self.gen.num_remaining_jobs() == 0, "jobs left that never ran: the queue is stuck"
        assert self.gen.pool.num_used == 0
        self.gen.pool.check()


# 120 runs of up to 100 rules each, every "step" rule 1-3 scheduler steps: well over 10,000 operations.
GeneratorMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=100, deadline=None)
TestGeneratorMachine = GeneratorMachine.TestCase


def test_same_seed_same_tokens_whatever_the_batch():
    sampled = lg.Sampler.Settings(temperature=1.0, top_k=0, top_p=1.0)
    # a stub model's logits depend on the step, so compare a job's draws through the sampler alone
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    from lowgear.engine.sampler import sample

    a = sample(logits, [sampled] * 3, [[1]] * 3, [torch.Generator().manual_seed(7) for _ in range(3)])
    b = sample(logits[1:2], [sampled], [[1]], [torch.Generator().manual_seed(7)])
    assert a[1] == b[0]


class PoisonModel(StubModel):
    """Logits go NaN for any sequence whose new tokens include POISON (as fp16 overflow would)."""

    POISON = VOCAB - 1

    def __init__(self, fill: str = "nan"):
        super().__init__()
        self.fill = fill

    def forward(self, ids, meta, cache):
        logits = super().forward(ids, meta, cache)
        logits[:, self.POISON] = float("-inf")  # healthy rows never sample the poison token
        bounds = [0, *torch.tensor(meta.q_lens_host).cumsum(0).tolist()]
        for s in range(meta.batch_size):
            if (ids[bounds[s] : bounds[s + 1]] == self.POISON).any():
                if self.fill == "+inf":
                    logits[s, 3] = float("inf")
                else:
                    logits[s] = float(self.fill)  # "nan", or "-inf": every token masked
        return logits


@pytest.mark.parametrize("fill", ["nan", "+inf", "-inf"])
@pytest.mark.parametrize("bad_greedy", [False, True])  # True: an all-greedy batch (argmax from the max reduction)
def test_non_finite_logits_end_that_job_only_with_a_clear_error(fill, bad_greedy):
    gen = make_generator(num_pages=64, max_batch_size=4)
    gen.model = PoisonModel(fill)
    healthy = [lg.DynamicJob([5, 6, 7, 8 + i], max_new_tokens=6, gen_settings=lg.Sampler.Settings.greedy()) for i in range(3)]
    bad = lg.DynamicJob([5, 6, PoisonModel.POISON], max_new_tokens=6,
                        gen_settings=lg.Sampler.Settings.greedy() if bad_greedy else None)
    gen.enqueue(healthy[:2] + [bad] + healthy[2:])
    results = []
    while gen.num_remaining_jobs():
        results.extend(gen.iterate())
    failed = [r for r in results if r["eos"] and r["eos_reason"] == "error"]
    assert [r["job"] for r in failed] == [bad]
    assert "non-finite" in failed[0]["error"] and bad.error == failed[0]["error"]
    assert all(len(j.generated) == 6 and j.eos_reason == "max_new_tokens" for j in healthy)
    assert gen.pool.num_used == 0
    gen.pool.check()
