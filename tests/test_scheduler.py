"""engine/scheduler.py without a model: plain fake jobs, a fake KV cache that records, per slot, the
token prefix whose K/V it holds, and hypothesis driving random arrivals, steps and cancels.

Invariants checked after every operation: each page's reference count is the number of running
jobs holding it; no page is written by two jobs in one step and no job writes a page another running
job holds unless it is that page's one writer; every cached position a step reads holds the K/V of
the reading job's own prefix (so a shared page is read only once computed); jobs start in arrival
order; at the end every page is free or cached.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lowgear.cache.pages import PagePool
from lowgear.engine.scheduler import Scheduler

PAGE = 4


class FakeJob:
    def __init__(self, prompt, max_new_tokens):
        self.prompt_ids = list(prompt)
        self.generated: list[int] = []
        self.max_new_tokens = max_new_tokens
        self.computed = 0
        self.pages = None
        self.seq = None
        self.borrowed_end = 0
        self.cached_prefix_tokens = 0
        self.finished = False

    @property
    def all_ids(self):
        return self.prompt_ids + self.generated

    @property
    def total_tokens_needed(self):
        return len(self.prompt_ids) + self.max_new_tokens


class FakeCache:
    """slot -> the tuple of tokens (the whole prefix) whose last token's K/V the slot holds."""

    def __init__(self):
        self.slots: dict[int, tuple] = {}

    def run(self, batch, page_size):
        """Check what each row reads, then write what it computes; returns the jobs given a token."""
        written: dict[int, object] = {}
        for job, n in batch:
            ids = job.all_ids
            for p in range(job.computed):  # what the step's attention reads
                slot = job.pages[p // page_size] * page_size + p % page_size
                assert self.slots.get(slot) == tuple(ids[: p + 1]), f"job reads stale K/V at position {p}"
            for p in range(job.computed, job.computed + n):
                slot = job.pages[p // page_size] * page_size + p % page_size
                assert slot not in written, "two rows of one step write the same slot"
                written[slot] = job
        for job, n in batch:
            ids = job.all_ids
            for p in range(job.computed, job.computed + n):
                self.slots[job.pages[p // page_size] * page_size + p % page_size] = tuple(ids[: p + 1])
        return [job for job, n in batch if job.computed + n == len(job.all_ids)]


def step(sched: Scheduler, cache: FakeCache, next_token=lambda job: 7, started=None):
    new = sched.admit()
    if started is not None:
        started.extend(new)
    batch = sched.plan()
    assert sum(n for _, n in batch) <= sched.max_chunk_size
    assert len({id(j) for j, _ in batch}) == len(batch)
    done = cache.run(batch, sched.page_size)
    for job, n in batch:
        sched.book(job, n)
    for job in done:
        job.generated.append(next_token(job))
        if len(job.generated) == job.max_new_tokens:
            job.finished = True
            sched.remove(job)
    return batch


def drain(sched, cache, limit=500):
    for _ in range(limit):
        if not sched.queue and not sched.running:
            return
        step(sched, cache)
    raise AssertionError("jobs left that never finished")


# ---------------------------------------------------------------------------- hand-made cases
def test_admission_keeps_arrival_order_and_waits_for_pages():
    pool = PagePool(6, PAGE)
    sched = Scheduler(pool, max_batch_size=4, max_chunk_size=64)
    big, small, tiny = FakeJob([1] * 15, 5), FakeJob([2] * 3, 1), FakeJob([3] * 2, 1)  # 5, 1, 1 pages
    sched.queue.extend([big, small, tiny])
    assert sched.admit() == [big, small]  # 5 + 1 pages: all of them
    assert pool.num_used == 6 and list(sched.queue) == [tiny]
    assert sched.admit() == []  # no page: the head waits
    drain(sched, FakeCache())
    assert pool.num_used == 0 and big.finished and small.finished and tiny.finished


def test_head_of_queue_is_never_overtaken():
    pool = PagePool(4, PAGE)
    sched = Scheduler(pool, max_batch_size=4, max_chunk_size=64)
    first, big, small = FakeJob([1] * 7, 1), FakeJob([2] * 11, 1), FakeJob([3], 1)  # 2, 3, 1 pages
    sched.queue.extend([first, big, small])
    assert sched.admit() == [first]  # big needs 3 pages, 2 are free; small (1 page) must wait behind it
    assert list(sched.queue) == [big, small]


def test_max_batch_size():
    sched = Scheduler(PagePool(64, PAGE), max_batch_size=2, max_chunk_size=64)
    jobs = [FakeJob([i + 1] * 3, 2) for i in range(3)]
    sched.queue.extend(jobs)
    assert sched.admit() == jobs[:2] and len(sched.running) == 2


def test_remove_queued_running_and_unknown_jobs():
    pool = PagePool(8, PAGE)
    sched = Scheduler(pool, max_batch_size=1, max_chunk_size=64)
    running, queued, stranger = FakeJob([1] * 5, 3), FakeJob([2] * 5, 3), FakeJob([3], 1)
    sched.queue.extend([running, queued])
    sched.admit()
    assert sched.remove(queued) is True and list(sched.queue) == [] and queued.pages is None
    assert sched.remove(running) is True and sched.running == [] and running.pages is None
    assert pool.num_used == 0
    assert sched.remove(running) is False and sched.remove(stranger) is False


def test_plan_decode_first_then_chunks_in_budget():
    sched = Scheduler(PagePool(64, PAGE), max_batch_size=4, max_chunk_size=10)
    a, b, c = FakeJob([1] * 20, 3), FakeJob([2] * 2, 3), FakeJob([3] * 9, 3)
    sched.queue.extend([a, b, c])
    sched.admit()
    b.computed, b.generated = 2, [5]  # b decodes
    assert [(j, n) for j, n in sched.plan()] == [(b, 1), (a, 9)]
    a.computed = 18
    assert [(j, n) for j, n in sched.plan()] == [(b, 1), (a, 2), (c, 7)]


def test_plan_uses_the_last_token_of_budget():
    sched = Scheduler(PagePool(64, PAGE), max_batch_size=4, max_chunk_size=2)
    a, b = FakeJob([1] * 20, 3), FakeJob([2] * 2, 3)
    sched.queue.extend([a, b])
    sched.admit()
    b.computed, b.generated = 2, [5]
    assert sched.plan() == [(b, 1), (a, 1)]


def test_reserves_prompt_plus_max_new_tokens():
    pool = PagePool(64, PAGE)
    sched = Scheduler(pool, max_batch_size=4, max_chunk_size=64)
    job = FakeJob([1] * 9, 8)  # 17 tokens: 5 pages
    sched.queue.append(job)
    sched.admit()
    assert len(job.pages) == 5 and pool.num_used == 5


def _prompt(*pages):
    return [t for page in pages for t in page]


X, Y, Z, W = [11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34], [41, 42, 43, 44]


def test_prefix_reuse_counts_after_a_finished_job():
    pool = PagePool(32, PAGE)
    sched = Scheduler(pool, max_batch_size=4, max_chunk_size=64)
    cache = FakeCache()
    a = FakeJob(_prompt(Y, X, Z, [1]), 2)
    sched.queue.append(a)
    drain(sched, cache)
    # b's first page equals a's second (X), but a's first (Y) differs: nothing to share
    b, c, d = FakeJob(_prompt(X, X, [2]), 2), FakeJob(_prompt(Y, X, W, [3]), 2), FakeJob(_prompt(Y, X, Z), 2)
    for job in (b, c, d):
        sched.queue.append(job)
        sched.admit()
        drain(sched, cache)
    # b: page X follows nothing in a; c: Y,X shared; d: Y,X shared, Z holds its last token (recomputed)
    assert (b.cached_prefix_tokens, c.cached_prefix_tokens, d.cached_prefix_tokens) == (0, 8, 8)


def test_a_page_filled_by_generated_tokens_is_shared_at_once():
    pool = PagePool(32, PAGE)
    sched = Scheduler(pool, max_batch_size=4, max_chunk_size=64)
    cache = FakeCache()
    a = FakeJob([1, 2, 3], 2)  # 3 prompt tokens + 2 generated: the 4 computed fill page 0 exactly
    sched.queue.append(a)
    drain(sched, cache)
    assert a.computed == 4
    b = FakeJob(a.all_ids + [5], 1)
    sched.queue.append(b)
    sched.admit()
    assert b.cached_prefix_tokens == 4


def _two_prefills(max_chunk_size):
    """A scheduler that has just admitted a (X Y Z ...) and b (X Y W ...), both still to prefill."""
    pool = PagePool(32, PAGE)
    sched = Scheduler(pool, max_batch_size=4, max_chunk_size=max_chunk_size)
    a, b = FakeJob(_prompt(X, Y, Z, [1]), 2), FakeJob(_prompt(X, Y, W, [2]), 2)
    sched.queue.extend([a, b])
    sched.admit()
    return pool, sched, FakeCache(), a, b


def test_jobs_prefilling_the_same_prefix_at_once_share_its_pages():
    pool, sched, cache, a, b = _two_prefills(64)
    assert a.pages[:2] == b.pages[:2] and pool.num_used == 4 + 2  # b borrows X, Y while a computes them
    first = step(sched, cache)
    assert first == [(a, 13)]  # b waits: it reads X, Y only once a has computed them
    second = step(sched, cache)
    assert (b, 5) in second and b.cached_prefix_tokens == 8
    drain(sched, cache)
    assert pool.num_used == 0


def test_a_cancelled_writer_hands_its_pages_to_a_borrower():
    pool, sched, cache, a, b = _two_prefills(5)
    assert step(sched, cache) == [(a, 5)]  # a computed page X and one token of Y
    a.finished = True
    sched.remove(a)
    batch = step(sched, cache)
    assert batch == [(b, 5)] and b.cached_prefix_tokens == 4  # X was computed by a; b computes Y itself
    drain(sched, cache)
    assert pool.num_used == 0
    pool.check()


def test_hand_over_passes_jobs_too_short_to_hold_the_page():
    pool = PagePool(32, PAGE)
    sched = Scheduler(pool, max_batch_size=4, max_chunk_size=5)
    cache = FakeCache()
    a, short, b = FakeJob(_prompt(X, Y, Z, [1]), 2), FakeJob([9], 3), FakeJob(_prompt(X, Y, W, [2]), 2)
    sched.queue.extend([a, short, b])
    sched.admit()
    assert len(short.pages) == 1 and step(sched, cache) == [(short, 1), (a, 4)]
    a.finished = True
    sched.remove(a)  # a's page Y (index 1) passes over `short` (one page) to b
    assert sched._writer[b.pages[1]][0] is b
    assert step(sched, cache) == [(short, 1), (b, 4)]
    drain(sched, cache)
    assert pool.num_used == 0


# ---------------------------------------------------------------------------- random traffic
PREFIXES = [_prompt(X, Y, Z), _prompt(X, Y, W), _prompt(Y, X, Z), _prompt(X, X, X)]


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = PagePool(20, PAGE)
        self.sched = Scheduler(self.pool, max_batch_size=3, max_chunk_size=9)
        self.cache = FakeCache()
        self.arrivals: list[FakeJob] = []
        self.started: list[FakeJob] = []
        self.cancelled: set[int] = set()

    @rule(prefix=st.sampled_from(range(len(PREFIXES))), cut=st.integers(1, 12),
          tail=st.lists(st.integers(1, 9), max_size=6), new=st.integers(1, 8))
    def enqueue(self, prefix, cut, tail, new):
        job = FakeJob(PREFIXES[prefix][:cut] + tail, new)
        self.sched.queue.append(job)
        self.arrivals.append(job)

    @rule(n=st.integers(1, 3), token=st.integers(1, 9))
    def run(self, n, token):
        for _ in range(n):
            step(self.sched, self.cache, lambda job: token, self.started)

    @precondition(lambda self: self.arrivals)
    @rule(i=st.integers(0, 1000))
    def cancel(self, i):
        job = self.arrivals[i % len(self.arrivals)]
        if not job.finished and self.sched.remove(job):
            job.finished = True
            self.cancelled.add(id(job))

    @invariant()
    def pages_held_as_counted(self):
        self.pool.check()
        holders: dict[int, int] = {}
        for job in self.sched.running:
            for p in job.pages:
                holders[p] = holders.get(p, 0) + 1
        for p in range(self.pool.num_pages):
            assert self.pool.refcount(p) == holders.get(p, 0)

    @invariant()
    def shared_pages_have_one_writer(self):
        for page, (writer, index, _) in self.sched._writer.items():
            assert writer in self.sched.running and writer.pages[index] == page
            assert writer.computed < (index + 1) * PAGE, "a page its writer computed is still marked in flight"

    @invariant()
    def arrival_order(self):
        order = [j for j in self.arrivals if id(j) not in self.cancelled or j in self.started]
        ran = [j for j in order if j in self.started]
        assert ran == order[: len(ran)], "a job started before one that arrived earlier"

    def teardown(self):
        drain(self.sched, self.cache)
        assert self.pool.num_used == 0 and not self.sched._writer and not self.sched._in_flight
        self.pool.check()


SchedulerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestSchedulerMachine = SchedulerMachine.TestCase
