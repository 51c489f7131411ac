"""Page bookkeeping for the paged KV cache: who holds which page, and which pages hold which prefix.

Pure Python, no tensors: the cache's K/V tensors (cache.kv) have `num_pages` pages of `page_size`
tokens, and this module only decides which page ids a sequence may write and read.

Every page is in exactly one of three states:
- *in use*: its reference count is > 0 (several sequences may share a page of a common prefix);
- *cached*: unreferenced, but it holds a full page of a registered prefix (cache.prefix keys), so a
  later prompt with the same start can take it back instead of recomputing it; cached pages sit in
  an LRU and are evicted, oldest first, when free pages run out;
- *free*: unreferenced and holding nothing anyone can find.

`PagePool` is the accounting; `SequencePages` is one job's view of it (reuse a cached prefix, grow
as tokens arrive, register pages as they fill, release everything at the end).
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from typing import Iterable, Mapping, Sequence

from ..errors import LowgearError
from .prefix import page_key, prefix_keys


class OutOfPages(LowgearError):
    """Not enough free or reclaimable pages for a request; nothing was changed."""


class PageAccountingError(AssertionError):
    """A page was released, shared or registered in a state that makes no sense: a bug, not a user error."""


def pages_needed(num_tokens: int, page_size: int) -> int:
    """How many pages hold `num_tokens` tokens."""
    return -(-num_tokens // page_size)


class PagePool:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"a page pool needs num_pages > 0 and page_size > 0, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._refs = [0] * num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._cached: OrderedDict[int, None] = OrderedDict()  # LRU: oldest first
        self._key_of: dict[int, int] = {}  # page -> key
        self._page_of: dict[int, int] = {}  # key -> page
        self._num_used = 0

    # ------------------------------------------------------------------ counts
    @property
    def num_free(self) -> int:
        """Pages `allocate` can hand out now: truly free plus cached (reclaimable)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self._num_used

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def refcount(self, page_id: int) -> int:
        return self._refs[page_id]

    def key_of(self, page_id: int) -> int | None:
        return self._key_of.get(page_id)

    # ------------------------------------------------------------------ allocation
    def allocate(self, n: int) -> list[int]:
        """Take `n` pages (reference count 1): free ones first, then the least recently used cached ones."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > self.num_pages:
            raise OutOfPages(
                f"a request for {n} pages of {self.page_size} tokens is larger than the whole cache "
                f"({self.num_pages} pages, {self.num_pages * self.page_size} tokens): shorten the prompt "
                "or max_new_tokens, or make the cache larger (max_seq_len)"
            )
        if n > self.num_free:
            raise OutOfPages(
                f"{n} pages needed but only {self.num_free} of {self.num_pages} are free: wait for running "
                "jobs to finish, or make the cache larger (max_seq_len)"
            )
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._cached.popitem(last=False)
                del self._page_of[self._key_of.pop(page)]
            self._refs[page] = 1
            out.append(page)
        self._num_used += n
        return out

    def share(self, page_ids: Iterable[int]) -> None:
        """Add a reference to each page (in use or cached; a cached page comes back into use)."""
        page_ids = list(page_ids)
        for page in page_ids:
            self._check_id(page)
            if self._refs[page] == 0 and page not in self._cached:
                raise PageAccountingError(f"page {page} is free: its content is gone and it cannot be shared")
        for page in page_ids:
            if self._refs[page] == 0:
                del self._cached[page]
                self._num_used += 1
            self._refs[page] += 1

    def release(self, page_ids: Iterable[int]) -> None:
        """Drop a reference to each page; an unreferenced page is cached if registered, else freed."""
        page_ids = list(page_ids)
        for page, times in Counter(page_ids).items():
            self._check_id(page)
            if times > self._refs[page]:
                raise PageAccountingError(
                    f"page {page} released {times} time(s) but holds {self._refs[page]} reference(s): double release"
                )
        for page in page_ids:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._num_used -= 1
                if page in self._key_of:
                    self._cached[page] = None  # most recently used end
                else:
                    self._free.append(page)

    # ------------------------------------------------------------------ prefixes
    def register(self, page_id: int, key: int) -> int:
        """Record that in-use page `page_id` holds the full page named `key`; return the page that holds it.

        If another page already holds `key`, that one is kept and returned (and `page_id` stays
        unregistered), so the caller may switch to it and release its own copy.
        """
        self._check_id(page_id)
        if self._refs[page_id] == 0:
            raise PageAccountingError(f"page {page_id} is not in use and cannot be registered")
        existing = self._page_of.get(key)
        if existing is not None:
            return existing
        if page_id in self._key_of:
            raise PageAccountingError(
                f"page {page_id} is already registered under another key; a full page's content cannot change"
            )
        self._page_of[key] = page_id
        self._key_of[page_id] = key
        return page_id

    def lookup_prefix(self, keys: Sequence[int]) -> list[int]:
        """Pages of the longest run of leading `keys` that some page holds (in use or cached)."""
        out = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            out.append(page)
        return out

    # ------------------------------------------------------------------ invariants
    def _check_id(self, page: int) -> None:
        if not (isinstance(page, int) and 0 <= page < self.num_pages):
            raise PageAccountingError(f"page id {page!r} is outside the pool of {self.num_pages} pages")

    def check(self) -> None:
        """Raise PageAccountingError unless every page is in exactly one state and the key maps agree."""

        def require(ok: bool, what: str) -> None:
            if not ok:
                raise PageAccountingError(what)

        free = set(self._free)
        require(len(free) == len(self._free), "a page is on the free list twice")
        require(not (free & self._cached.keys()), "a page is both free and cached")
        used = 0
        for page, refs in enumerate(self._refs):
            require(refs >= 0, f"page {page} has a negative reference count {refs}")
            states = (refs > 0) + (page in free) + (page in self._cached)
            require(states == 1, f"page {page} is in {states} states (refs={refs})")
            used += refs > 0
        require(used == self._num_used, f"num_used {self._num_used} but {used} pages have references")
        require(all(p not in self._key_of for p in free), "a free page still has a key")
        require(all(p in self._key_of for p in self._cached), "a cached page has no key")
        require(len(self._key_of) == len(self._page_of), "the key maps differ in size")
        require(all(self._page_of.get(k) == p for p, k in self._key_of.items()), "the key maps disagree")


class SequencePages:
    """The pages of one job: a reused cached prefix, then pages allocated as its tokens grow.

    Built from the pool and the prompt, it shares the pages of the longest registered full-page
    prefix, then (given `in_flight`, key -> page) the following pages another sequence is still
    computing: `num_borrowed` of them, which the caller must not read before they are computed.
    `num_computed` says how many leading tokens need no forward pass. The page holding the
    prompt's last token is never reused, since the model must run that token for its logits.
    `page_ids` is the job's block table, in order.
    """

    def __init__(self, pool: PagePool, prompt_tokens: Sequence[int], in_flight: Mapping[int, int] | None = None,
                 share: bool = True):
        self.pool = pool
        self.page_size = ps = pool.page_size
        self.prompt_keys = prefix_keys(prompt_tokens, ps) if share else []  # every full prompt page's key
        reusable = max(len(prompt_tokens) - 1, 0) // ps
        keys = self.prompt_keys[:reusable]
        shared = pool.lookup_prefix(keys)
        borrowed: list[int] = []  # pages another sequence is still computing (in_flight: key -> page)
        for key in keys[len(shared) :] if in_flight else ():
            page = in_flight.get(key)
            if page is None:
                break
            borrowed.append(page)
        pool.share(shared + borrowed)
        self.page_ids: list[int] = shared + borrowed
        self.keys: list[int] = keys[: len(shared)]  # keys of the leading registered pages
        self.num_computed = len(shared) * ps
        self.num_reused_tokens = self.num_computed
        self.num_borrowed = len(borrowed)
        self.freed = False

    def pages_needed(self, num_tokens: int) -> int:
        """How many more pages holding `num_tokens` tokens in all would take."""
        return max(pages_needed(num_tokens, self.page_size) - len(self.page_ids), 0)

    def ensure(self, num_tokens: int) -> list[int]:
        """Make room for `num_tokens` tokens in all; return the new pages. OutOfPages changes nothing."""
        if self.freed:
            raise PageAccountingError("this sequence's pages were freed already")
        new = self.pool.allocate(self.pages_needed(num_tokens))
        self.page_ids.extend(new)
        return new

    def register_full(self, tokens: Sequence[int], num_computed: int | None = None) -> bool:
        """Register each page that has become full of computed tokens (`tokens`: the job's tokens so far).

        Returns True when a page was replaced by an identical one already in the pool (the block
        table changed: re-read `page_ids`).
        """
        num_computed = len(tokens) if num_computed is None else num_computed
        if num_computed > len(tokens) or num_computed > len(self.page_ids) * self.page_size:
            raise PageAccountingError(
                f"{num_computed} computed tokens but {len(tokens)} tokens and {len(self.page_ids)} pages"
            )
        self.num_computed = max(self.num_computed, num_computed)
        swapped = False
        ps = self.page_size
        while (len(self.keys) + 1) * ps <= num_computed:
            p = len(self.keys)
            if p < len(self.prompt_keys):
                key = self.prompt_keys[p]
            else:
                key = page_key(self.keys[-1] if self.keys else None, tokens[p * ps : (p + 1) * ps])
            own = self.page_ids[p]
            holder = self.pool.register(own, key)
            if holder != own:
                self.pool.share([holder])
                self.pool.release([own])
                self.page_ids[p] = holder
                swapped = True
            self.keys.append(key)
        return swapped

    def free(self) -> None:
        """Release every page (finish or cancel); registered pages stay cached for later prompts."""
        if not self.freed:
            self.pool.release(self.page_ids)
            self.page_ids = []
            self.freed = True
