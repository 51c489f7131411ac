"""`Scheduler`: which jobs run, which cache pages they hold, and what each step computes.

Pure Python, no tensors and no model, so it is tested with plain fakes. A job needs `prompt_ids`,
`all_ids`, `total_tokens_needed`, `computed` (tokens whose K/V are in the cache), `pages` and
`finished`; the scheduler sets `pages`, `computed`, `seq` and `cached_prefix_tokens`.

- Admission: queued jobs start in arrival order while there are batch slots; a job reserves the
  pages for its prompt plus max_new_tokens when it starts (cache.pages.SequencePages), so running
  jobs never run out, and the queue's head waits for pages (no job overtakes it).
- Prefix matching: a prompt's full pages are keyed by chained keys (cache.prefix.prefix_keys); a new
  job shares the pages of the longest computed prefix in the pool, then the following pages that a
  running job is still prefilling ("in flight"). A borrowed in-flight page is read only once its
  writer has computed it: until then the borrower is left out of the steps (it waits, it never
  recomputes), and if the writer is cancelled first, the earliest running holder becomes the writer.
- Planning: decode tokens first (a long prompt never stalls running streams), then prefill chunks
  up to `max_chunk_size` tokens in all.
"""

from __future__ import annotations

from collections import deque

from ..cache.pages import OutOfPages, PagePool, SequencePages


class Scheduler:
    def __init__(self, pool: PagePool, max_batch_size: int, max_chunk_size: int, paged: bool = True):
        self.pool = pool
        self.page_size = pool.page_size
        self.max_batch_size = max_batch_size
        self.max_chunk_size = max_chunk_size
        self.paged = paged
        self.queue: deque = deque()
        self.running: list = []
        self._in_flight: dict[int, int] = {}  # key -> page a running job is computing for its prompt
        self._writer: dict[int, tuple[object, int, int]] = {}  # page -> (job computing it, its index, key)

    # ---------------------------------------------------------------- admission
    def admit(self, on_start=None) -> list:
        """Start queued jobs in arrival order while there are batch slots and pages; return them."""
        started = []
        while self.queue and len(self.running) < self.max_batch_size:
            job = self.queue[0]
            if not self._start(job):
                break  # wait for pages: keep arrival order
            self.queue.popleft()
            self.running.append(job)
            started.append(job)
            if on_start is not None:
                on_start(job)
        return started

    def _start(self, job) -> bool:
        ps = self.page_size
        seq = SequencePages(self.pool, job.prompt_ids, self._in_flight, share=self.paged)
        try:
            seq.ensure(job.total_tokens_needed)
        except OutOfPages:
            seq.free()
            return False
        job.seq, job.pages = seq, seq.page_ids
        job.computed = seq.num_computed
        job.cached_prefix_tokens = seq.num_reused_tokens
        job.borrowed_end = (len(seq.keys) + seq.num_borrowed) * ps  # tokens covered by shared pages
        for p in range(len(seq.keys) + seq.num_borrowed, len(seq.prompt_keys)):
            key = seq.prompt_keys[p]  # a full prompt page this job computes: later prompts may borrow it
            if key not in self._in_flight:
                self._in_flight[key] = seq.page_ids[p]
                self._writer[seq.page_ids[p]] = (job, p, key)
        return True

    # ---------------------------------------------------------------- end of a job
    def remove(self, job) -> bool:
        """Take a job out (finished, failed or cancelled) and release its pages; False if unknown."""
        if job in self.queue:
            self.queue.remove(job)
            return True
        if job not in self.running:
            return False
        self.running.remove(job)
        self.release(job)
        return True

    def release(self, job) -> None:
        """Give back a job's pages; pages it was still computing for others pass to their next holder."""
        if job.pages is None:
            return
        for page in job.pages:
            entry = self._writer.get(page)
            if entry is not None and entry[0] is job:
                self._hand_over(page, entry)
        job.seq.free()
        job.pages = None

    def _hand_over(self, page: int, entry) -> None:
        writer, index, key = entry
        for other in self.running:
            if other is not writer and other.pages is not None and len(other.pages) > index and other.pages[index] == page:
                self._writer[page] = (other, index, key)
                return
        del self._writer[page]
        del self._in_flight[key]

    # ---------------------------------------------------------------- one step
    def _ready(self, job) -> bool:
        """Whether the job may compute now: not waiting for a borrowed page another job computes."""
        while job.computed < job.borrowed_end:
            entry = self._writer.get(job.pages[job.computed // self.page_size])
            if entry is not None:
                return entry[0] is job
            job.computed += self.page_size  # computed by its writer meanwhile
            job.cached_prefix_tokens += self.page_size
        return True

    def plan(self) -> list[tuple[object, int]]:
        """(job, tokens to compute) for this step: decode tokens first, then prefill chunks in the budget."""
        budget = self.max_chunk_size
        batch: list[tuple[object, int]] = []
        prefill = []
        for job in self.running:
            pending = len(job.all_ids) - job.computed
            if pending == 1:
                batch.append((job, 1))
                budget -= 1
            elif pending > 1:
                prefill.append(job)
        for job in prefill:
            if budget > 0 and self._ready(job):
                chunk = min(len(job.all_ids) - job.computed, budget)
                batch.append((job, chunk))
                budget -= chunk
        return batch

    def book(self, job, n: int) -> None:
        """Record that a step computed the job's next n tokens; register the pages they filled."""
        job.computed += n
        if not self.paged:
            return
        seq, ps = job.seq, self.page_size
        for p in range(len(seq.keys), job.computed // ps):
            entry = self._writer.get(seq.page_ids[p])
            if entry is not None and entry[0] is job:  # computed now: borrowers may read it
                del self._writer[seq.page_ids[p]]
                del self._in_flight[entry[2]]
        if (len(seq.keys) + 1) * ps <= job.computed:
            seq.register_full(job.all_ids, job.computed)
