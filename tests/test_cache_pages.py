"""Tests for cache/pages.py (PagePool, SequencePages) and cache/prefix.py (page keys).

The random-operation tests run a small simulated scheduler over a pool and, beside the pool's own
invariants (`check()` after every step), keep a model of what each page's KV would contain: every
slot remembers the token prefix it was computed from. A reused page must hold exactly the prefix
of the prompt that reuses it, and no sequence may write into a page that someone else shares.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lowgear.cache.pages import OutOfPages, PageAccountingError, PagePool, SequencePages, pages_needed
from lowgear.cache.prefix import page_key, prefix_keys
from lowgear.errors import LowgearError

# ---------------------------------------------------------------------------- prefix keys


def test_page_key_is_stable_and_chained():
    # Pinned: keys must not change between processes or releases (they are compared across them).
    assert page_key(None, [1, 2, 3]) == 2014164797232145444
    a = page_key(None, [1, 2])
    assert page_key(None, [1, 2]) == a
    assert page_key(a, [3, 4]) != page_key(None, [3, 4])
    assert page_key(a, [3, 4]) != page_key(page_key(None, [1, 3]), [3, 4])
    assert 0 <= a < 2**64


def test_prefix_keys_cover_full_pages_only():
    tokens = list(range(10))
    keys = prefix_keys(tokens, 4)
    assert len(keys) == 2
    assert keys[0] == page_key(None, tokens[:4])
    assert keys[1] == page_key(keys[0], tokens[4:8])
    assert prefix_keys(tokens[:3], 4) == []
    assert prefix_keys(tokens[:8], 4) == keys
    assert prefix_keys(tokens[:9] + [99], 4) == keys  # the partial page does not matter
    with pytest.raises(ValueError):
        prefix_keys(tokens, 0)


# ---------------------------------------------------------------------------- PagePool


def snapshot(pool: PagePool):
    return (list(pool._refs), list(pool._free), list(pool._cached), dict(pool._key_of), pool.num_used)


def test_allocate_prefers_free_then_evicts_lru_cached():
    pool = PagePool(4, 2)
    a = pool.allocate(4)
    for i, page in enumerate(a):
        pool.register(page, 100 + i)
    pool.release([a[2]])
    pool.release([a[0]])
    pool.release([a[3]])  # cached, oldest first: a2, a0, a3
    assert pool.num_cached == 3 and pool.num_free == 3 and pool.num_used == 1
    assert pool.allocate(2) == [a[2], a[0]]
    assert pool.lookup_prefix([100]) == [] and pool.lookup_prefix([103]) == [a[3]]
    pool.check()


def test_free_pages_go_before_cached_ones():
    pool = PagePool(3, 2)
    a, b, c = pool.allocate(3)
    pool.register(a, 1)
    pool.release([a])
    pool.release([b])
    assert pool.allocate(1) == [b]
    assert pool.allocate(1) == [a]  # only then the cached one
    assert pool.lookup_prefix([1]) == []
    pool.check()


def test_out_of_pages_changes_nothing():
    pool = PagePool(4, 8)
    a = pool.allocate(3)
    pool.register(a[0], 7)
    pool.release([a[0]])
    before = snapshot(pool)
    with pytest.raises(OutOfPages, match="only 2 of 4 are free"):
        pool.allocate(3)
    assert snapshot(pool) == before
    pool.check()


def test_request_larger_than_pool_says_so():
    pool = PagePool(8, 256)
    with pytest.raises(OutOfPages, match="larger than the whole cache") as err:
        pool.allocate(9)
    assert isinstance(err.value, LowgearError)
    assert "8 pages" in str(err.value) and "2048 tokens" in str(err.value) and "max_seq_len" in str(err.value)
    seq = SequencePages(pool, list(range(3000)))
    with pytest.raises(OutOfPages, match="larger than the whole cache"):
        seq.ensure(3000)
    assert seq.page_ids == [] and pool.num_free == 8
    pool.check()


def test_share_revives_cached_and_refuses_free():
    pool = PagePool(2, 2)
    a, b = pool.allocate(2)
    pool.register(a, 5)
    pool.release([a, b])
    assert pool.num_cached == 1
    pool.share([a])
    assert pool.refcount(a) == 1 and pool.num_cached == 0 and pool.num_used == 1
    pool.share([a])
    assert pool.refcount(a) == 2
    with pytest.raises(PageAccountingError, match="free"):
        pool.share([b])
    pool.release([a, a])
    assert pool.num_cached == 1
    pool.check()


def test_double_release_is_an_internal_error():
    pool = PagePool(2, 2)
    (a,) = pool.allocate(1)
    pool.release([a])
    with pytest.raises(PageAccountingError, match="double release"):
        pool.release([a])
    (b,) = pool.allocate(1)
    with pytest.raises(AssertionError):
        pool.release([b, b])  # one reference, released twice in one call: nothing changes
    assert pool.refcount(b) == 1
    with pytest.raises(PageAccountingError, match="outside"):
        pool.release([7])
    pool.check()


def test_register_keeps_the_first_holder():
    pool = PagePool(3, 2)
    a, b = pool.allocate(2)
    assert pool.register(a, 42) == a
    assert pool.register(a, 42) == a
    assert pool.register(b, 42) == a  # caller may dedupe
    assert pool.key_of(b) is None
    with pytest.raises(PageAccountingError, match="already registered"):
        pool.register(a, 43)
    pool.release([b])
    with pytest.raises(PageAccountingError, match="not in use"):
        pool.register(b, 44)
    pool.check()


def test_lookup_prefix_stops_at_first_missing_key():
    pool = PagePool(4, 2)
    pages = pool.allocate(3)
    for page, key in zip(pages, [1, 2, 4]):
        pool.register(page, key)
    assert pool.lookup_prefix([1, 2, 3, 4]) == pages[:2]
    assert pool.lookup_prefix([2, 1]) == [pages[1], pages[0]]
    assert pool.lookup_prefix([9]) == []


def test_check_catches_corruption():
    pool = PagePool(3, 2)
    pool.allocate(1)
    pool._free.append(0)
    with pytest.raises(PageAccountingError):
        pool.check()


def test_pages_needed():
    assert [pages_needed(n, 256) for n in (0, 1, 256, 257, 600)] == [0, 1, 1, 2, 3]


# ---------------------------------------------------------------------------- SequencePages


def test_common_600_token_prefix_shares_exactly_two_pages():
    pool = PagePool(16, 256)
    rng = random.Random(0)
    common = [rng.randrange(32000) for _ in range(600)]
    first = common + [1] * 100
    second = common + [2] * 150
    a = SequencePages(pool, first)
    assert a.num_computed == 0
    a.ensure(len(first))
    a.register_full(first)
    b = SequencePages(pool, second)
    assert b.num_computed == 512 and b.num_reused_tokens == 512
    b.ensure(len(second))
    assert len(set(a.page_ids) & set(b.page_ids)) == 2
    assert b.page_ids[:2] == a.page_ids[:2]
    assert pool.num_used == len(a.page_ids) + len(b.page_ids) - 2
    a.free()
    b.free()
    assert pool.num_used == 0 and pool.num_free == 16 and pool.num_cached == 2
    pool.check()


def test_prompt_fully_cached_still_recomputes_its_last_page():
    pool = PagePool(4, 4)
    prompt = list(range(8))
    a = SequencePages(pool, prompt)
    a.ensure(8)
    a.register_full(prompt)
    a.free()
    b = SequencePages(pool, prompt)
    assert b.num_computed == 4  # the page with the last token is recomputed for its logits
    b.ensure(8)
    assert b.register_full(prompt) is True  # identical page found: switched to it
    assert b.page_ids == a_pages(pool, prompt)
    b.free()
    pool.check()


def a_pages(pool: PagePool, tokens: list[int]) -> list[int]:
    return pool.lookup_prefix(prefix_keys(tokens, pool.page_size))


def test_growth_registers_generated_pages():
    pool = PagePool(8, 4)
    tokens = [1, 2, 3]
    seq = SequencePages(pool, tokens)
    seq.ensure(3)
    assert len(seq.page_ids) == 1
    for t in range(4, 14):
        tokens.append(t)
        seq.ensure(len(tokens))
        seq.register_full(tokens, num_computed=len(tokens) - 1)  # the newest token is not computed yet
    assert len(seq.page_ids) == pages_needed(13, 4) == 4
    assert len(seq.keys) == 3  # 12 computed tokens: three full pages
    seq.free()
    assert pool.num_cached == 3
    with pytest.raises(PageAccountingError):
        seq.ensure(20)
    pool.check()


# ---------------------------------------------------------------------------- random operations


class Simulator:
    """A toy scheduler over a PagePool, with a model of every page's KV content."""

    def __init__(self, num_pages: int, page_size: int, rng: random.Random):
        self.pool = PagePool(num_pages, page_size)
        self.ps = page_size
        self.rng = rng
        self.jobs: dict[int, tuple[SequencePages, list[int]]] = {}
        self.next_id = 0
        # content[page][slot]: the token prefix whose last token's K/V the slot holds
        self.content: list[list[tuple | None]] = [[None] * page_size for _ in range(num_pages)]
        self.ops = 0
        self.out_of_pages = 0
        self.reused_tokens = 0

    def random_tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(2) for _ in range(n)]  # tiny alphabet: prefixes collide

    def verify_prefix(self, seq: SequencePages, tokens: list[int]) -> None:
        for pos in range(seq.num_computed):
            page = seq.page_ids[pos // self.ps]
            assert self.content[page][pos % self.ps] == tuple(tokens[: pos + 1])

    def enqueue(self, prompt: list[int]) -> None:
        self.ops += 1
        seq = SequencePages(self.pool, prompt)
        self.verify_prefix(seq, prompt)
        self.reused_tokens += seq.num_reused_tokens
        before = snapshot(self.pool)
        try:
            seq.ensure(len(prompt))
        except OutOfPages:
            assert snapshot(self.pool) == before
            self.out_of_pages += 1
            seq.free()  # a scheduler would requeue the job
            return
        self.jobs[self.next_id] = (seq, list(prompt))
        self.next_id += 1

    def step(self, job: int, chunk: int) -> None:
        """Compute up to `chunk` tokens of a job, register its full pages, then maybe sample one more."""
        self.ops += 1
        seq, tokens = self.jobs[job]
        end = min(len(tokens), seq.num_computed + chunk)
        for pos in range(seq.num_computed, end):
            page = seq.page_ids[pos // self.ps]
            assert self.pool.refcount(page) == 1, "a sequence wrote into a page others share"
            self.content[page][pos % self.ps] = tuple(tokens[: pos + 1])
        seq.register_full(tokens, end)
        self.verify_prefix(seq, tokens)
        if end == len(tokens):
            tokens.append(self.rng.randrange(2))
            before = snapshot(self.pool)
            try:
                seq.ensure(len(tokens))
            except OutOfPages:
                assert snapshot(self.pool) == before
                self.out_of_pages += 1
                self.finish(job)  # a scheduler would preempt it; here it ends

    def finish(self, job: int) -> None:
        self.ops += 1
        seq, _ = self.jobs.pop(job)
        seq.free()

    def overallocate(self, extra: int) -> None:
        self.ops += 1
        before = snapshot(self.pool)
        with pytest.raises(OutOfPages):
            self.pool.allocate(self.pool.num_free + extra)
        assert snapshot(self.pool) == before

    def check(self) -> None:
        self.pool.check()
        holders: dict[int, int] = {}
        for seq, tokens in self.jobs.values():
            assert len(seq.page_ids) == pages_needed(len(tokens), self.ps)
            for page in seq.page_ids:
                holders[page] = holders.get(page, 0) + 1
        for page in range(self.pool.num_pages):
            assert self.pool.refcount(page) == holders.get(page, 0)

    def random_op(self) -> None:
        r = self.rng.random()
        if r < 0.3 or not self.jobs:
            base = self.rng.choice([[], [0, 1, 1, 0, 1, 0, 0, 1], [1] * 12])
            self.enqueue(base + self.random_tokens(self.rng.randrange(1, 14)))
        elif r < 0.8:
            self.step(self.rng.choice(list(self.jobs)), self.rng.randrange(1, 9))
        elif r < 0.95:
            self.finish(self.rng.choice(list(self.jobs)))
        else:
            self.overallocate(self.rng.randrange(1, 4))

    def drain(self) -> None:
        for job in list(self.jobs):
            self.finish(job)
        self.check()
        assert self.pool.num_used == 0
        assert self.pool.num_free == self.pool.num_pages
        assert self.pool.num_cached + len(self.pool._free) == self.pool.num_pages


@pytest.mark.parametrize("seed", range(5))
def test_ten_thousand_random_operations_leak_nothing(seed):
    rng = random.Random(seed)
    sim = Simulator(num_pages=rng.choice([6, 12, 24]), page_size=rng.choice([2, 4]), rng=rng)
    while sim.ops < 2_000:  # five seeds: 10,000 operations in all
        sim.random_op()
        sim.check()
    sim.drain()
    assert sim.reused_tokens > 0 and sim.out_of_pages > 0  # both paths were exercised


class PoolMachine(RuleBasedStateMachine):
    """The same simulated scheduler, driven and shrunk by hypothesis."""

    @initialize(num_pages=st.integers(1, 12), page_size=st.integers(1, 4), seed=st.integers(0, 2**16))
    def setup(self, num_pages, page_size, seed):
        self.sim = Simulator(num_pages, page_size, random.Random(seed))

    @rule(prompt=st.lists(st.integers(0, 1), min_size=1, max_size=20))
    def enqueue(self, prompt):
        self.sim.enqueue(prompt)

    @precondition(lambda self: self.sim.jobs)
    @rule(pick=st.integers(0, 100), chunk=st.integers(1, 8))
    def step(self, pick, chunk):
        jobs = sorted(self.sim.jobs)
        self.sim.step(jobs[pick % len(jobs)], chunk)

    @precondition(lambda self: self.sim.jobs)
    @rule(pick=st.integers(0, 100))
    def finish(self, pick):
        jobs = sorted(self.sim.jobs)
        self.sim.finish(jobs[pick % len(jobs)])

    @rule(extra=st.integers(1, 3))
    def overallocate(self, extra):
        self.sim.overallocate(extra)

    @invariant()
    def consistent(self):
        if hasattr(self, "sim"):
            self.sim.check()

    def teardown(self):
        if hasattr(self, "sim"):
            self.sim.drain()


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
