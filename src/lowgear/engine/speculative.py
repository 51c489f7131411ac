"""Speculative decoding: proposers and the acceptance test.

A speculating job in decode proposes k tokens d1..dk; the step feeds its last token and d1..dk as
one chunk (k+1 positions, through the paged cache like a prefill chunk) and keeps the target's
logits at every position. `verify` then accepts a prefix of the proposal and adds one token of the
target's own, so a step yields 1..k+1 tokens. K/V written for rejected positions stay in the job's
own pages past `computed`: nothing reads them (kv_lens end at `computed`) and the next step writes
those slots again.

Greedy jobs accept while d_i is the target's argmax, so the output is that of plain decoding.
Sampled jobs use speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023): with p
the target's distribution after the job's sampler settings and q the proposer's, d_i is accepted
with probability min(1, p(d_i)/q(d_i)); at the first rejection the token is drawn from
max(0, p - q) renormalized, and if all k are accepted one more is drawn from p at position k+1.
Each emitted token is then distributed as the target's. An n-gram proposal is deterministic: q is
a point mass on d_i.

Proposers:
- `NgramProposer`: the last n tokens (n = NGRAM_MAX down to 1) matched at their latest earlier
  occurrence in the job's prompt + output; the tokens that followed are the proposal.
- `DraftProposer`: a smaller model sharing the tokenizer, on its own cache, whose pages each job
  holds while it runs; it decodes k tokens (greedy or with the job's settings) and gives q. Where
  the generator gives it `graphs` (engine/graphs.DecodeGraphs of the draft model and cache, of
  q_len 1 and 2), its steps replay CUDA graphs: one token a row, or two where a row is two behind
  (all of its last proposal was accepted: the draft never computed the last proposal's K/V); a row
  further behind (a new job's prompt) runs eagerly. Greedy rows' later rounds are fed the argmax of
  the round before on the device, and all their tokens are read once, after the last round.

On a GPU the target's check steps replay graphs too: the generator's `check_graphs`, DecodeGraphs
of q_len k+1, with rows of fewer proposals (or none, in a batch with jobs that do not speculate)
padded (engine/runner.Runner.graphed).
"""

from __future__ import annotations

import torch

from .. import defaults
from ..attention.metadata import build_metadata
from ..cache.pages import OutOfPages, SequencePages
from ..errors import ConfigError
from .graphs import DecodeRow
from .sampler import all_greedy, distribution


def ngram_proposal(tokens: list[int], k: int, max_n: int = defaults.NGRAM_MAX) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's last n tokens."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), 0, -1):
        tail = tokens[length - n :]
        for start in range(length - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                return tokens[start + n : start + n + k]
    return []


def _draw(probs: torch.Tensor, rng: torch.Generator | None) -> int:
    """One token from the (unnormalized) probabilities [V], by inverse CDF with the job's generator."""
    cdf = torch.cumsum(probs.double(), dim=0)
    target = torch.rand(1, generator=rng, device=probs.device, dtype=torch.float64) * cdf[-1]
    return min(int(torch.searchsorted(cdf, target, right=True)), probs.shape[0] - 1)


def verify(logits: torch.Tensor, draft: list[int], q: torch.Tensor | None, settings, history: list[int],
           rng: torch.Generator | None) -> list[int] | None:
    """The tokens a step emits: the accepted prefix of `draft` then one of the target's.

    logits [k+1, V]: the target's at the job's last token and at d1..dk; q [k, V]: the proposer's
    probabilities (None: a point mass on each d_i); history: the job's tokens before this step.
    None when a logits row is not finite (the job fails).
    """
    if not bool(torch.isfinite(logits.max(dim=-1).values).all()):
        return None
    k = len(draft)
    if all_greedy([settings]):
        best = logits.argmax(dim=-1).tolist()
        out: list[int] = []
        while len(out) < k and draft[len(out)] == best[len(out)]:
            out.append(draft[len(out)])
        return out + [best[len(out)]]
    p = distribution(logits, [settings] * (k + 1), [history + draft[:i] for i in range(k + 1)])
    out = []
    for i, d in enumerate(draft):
        if q is not None:
            q_i = q[i].to(p.device)
        else:  # a point mass on d
            q_i = torch.zeros_like(p[i])
            q_i[d] = 1.0
        u = float(torch.rand(1, generator=rng, device=p.device))
        if u * float(q_i[d]) < float(p[i, d]):  # u < p/q without dividing by a q of 0
            out.append(d)
            continue
        residual = (p[i] - q_i).clamp_min(0)
        return out + [_draw(residual if float(residual.sum()) > 0 else p[i], rng)]
    return out + [_draw(p[k], rng)]


class NgramProposer:
    """Prompt lookup: `ngram_proposal`'s answer from an index per job that grows with its tokens
    (n-gram -> where its latest continuation starts), so a step costs O(new tokens), not O(length)."""

    def __init__(self, max_n: int = defaults.NGRAM_MAX):
        self.max_n = max_n
        self.state: dict[int, list] = {}  # id(job) -> [job, positions indexed, {n-gram: continuation start}]

    def lookup(self, job, tokens: list[int], k: int) -> list[int]:
        entry = self.state.setdefault(id(job), [job, 1, {}])
        index = entry[2]
        for i in range(entry[1], len(tokens)):  # i: a position that follows an n-gram
            for n in range(1, min(self.max_n, i) + 1):
                index[tuple(tokens[i - n : i])] = i
        entry[1] = max(entry[1], len(tokens))
        for n in range(min(self.max_n, len(tokens) - 1), 0, -1):
            start = index.get(tuple(tokens[len(tokens) - n :]))
            if start is not None:
                return tokens[start : start + k]
        return []

    def propose(self, jobs: list, ks: list[int]) -> list[tuple[list[int], torch.Tensor | None]]:
        return [(self.lookup(job, job.all_ids, k), None) for job, k in zip(jobs, ks)]

    def retain(self, jobs) -> None:
        keep = {id(j) for j in jobs}
        for key in [k for k in self.state if k not in keep]:
            del self.state[key]

    def accepted(self, job) -> None:
        pass


class DraftProposer:
    """A draft model on its own cache. Per job: its pages there and how many leading tokens they hold."""

    def __init__(self, model, cache, target):
        if not model.loaded:
            raise ConfigError("load the draft model first: draft_model.load_autosplit(draft_cache)")
        if not cache.allocated:
            cache.allocate()
        mine, theirs = model.spec.vocab_size, target.spec.vocab_size
        if mine != theirs:
            raise ConfigError(
                f"the draft model's vocabulary has {mine} tokens but the target's has {theirs}: "
                "speculative decoding needs a draft that shares the target's tokenizer (a smaller model of the same family)"
            )
        self.model, self.cache = model, cache
        self.state: dict[int, list] = {}  # id(job) -> [job, SequencePages, tokens whose K/V the draft cache holds]
        self.graphs: dict = {}  # q_len -> engine.graphs.DecodeGraphs of the draft model and cache (the generator's)
        self.steps = self.graphed_steps = 0  # the draft's forwards, and of those the ones run from its graphs

    def retain(self, jobs) -> None:
        """Free the draft pages of jobs no longer in `jobs`."""
        keep = {id(j) for j in jobs}
        for key in [k for k in self.state if k not in keep]:
            self.state.pop(key)[1].free()

    def _entry(self, job):
        entry = self.state.get(id(job))
        if entry is None:
            seq = SequencePages(self.cache.pool, job.prompt_ids, share=False)
            try:
                seq.ensure(job.total_tokens_needed)
            except OutOfPages:
                seq.free()
                return None  # no room in the draft cache: this job decodes without a proposal
            entry = self.state[id(job)] = [job, seq, 0]
        return entry

    def propose(self, jobs: list, ks: list[int]) -> list[tuple[list[int], torch.Tensor | None]]:
        entries = [self._entry(job) for job in jobs]
        live = [i for i, e in enumerate(entries) if e is not None]
        drafts: dict[int, list[int]] = {i: [] for i in live}
        probs: dict[int, list[torch.Tensor]] = {i: [] for i in live}
        rounds, r = max((ks[i] for i in live), default=0), 0
        while r < rounds:
            rows = [i for i in live if ks[i] > r]
            feeds = [(jobs[i].all_ids + drafts[i])[entries[i][2] :] for i in rows]
            logits = self._forward(feeds, [entries[i][2] for i in rows], [entries[i][1].page_ids for i in rows])
            r += 1
            for row, i in enumerate(rows):
                entries[i][2] += len(feeds[row])
            greedy = [all_greedy([jobs[i].settings]) for i in rows]
            if all(greedy) and 1 in self.graphs:
                r = self._greedy_rounds(rows, ks, entries, logits.argmax(dim=-1), drafts, r, rounds)
                continue
            best = logits.argmax(dim=-1).tolist() if any(greedy) else None  # one read for every greedy row
            for row, i in enumerate(rows):
                job = jobs[i]
                if greedy[row]:
                    drafts[i].append(best[row])
                    continue
                device = job.rng.device if job.rng is not None else logits.device
                q = distribution(logits[row : row + 1], [job.settings], [job.all_ids + drafts[i]])[0].to(device)
                probs[i].append(q)
                drafts[i].append(_draw(q, job.rng))
        out: list[tuple[list[int], torch.Tensor | None]] = []
        for i, job in enumerate(jobs):
            if i not in drafts:
                out.append(([], None))
                continue
            out.append((drafts[i], torch.stack(probs[i]) if probs[i] else None))
        return out

    def _greedy_rounds(self, rows, ks, entries, best: torch.Tensor, drafts, r: int, rounds: int) -> int:
        """Greedy rows' next rounds from the one-token graph, each fed the round before's argmax on the device
        (`best`), so no round waits for the host; they stop where a row has its k (or no graph fits), and the
        tokens of every round are read at once into `drafts`. Returns the next round to run."""
        picked = [best]
        while r < rounds and all(ks[i] > r for i in rows):
            logits = self.graphs[1].run([DecodeRow(0, entries[i][2] + 1, entries[i][1].page_ids) for i in rows],
                                        ids=picked[-1])
            if logits is None:
                break
            self.steps += 1
            self.graphed_steps += 1
            for i in rows:
                entries[i][2] += 1
            picked.append(logits.argmax(dim=-1))
            r += 1
        for i, tokens in zip(rows, torch.stack(picked, dim=1).tolist()):
            drafts[i].extend(tokens)
        return r

    def _forward(self, feeds: list[list[int]], starts: list[int], pages: list[list[int]]) -> torch.Tensor:
        """The draft's logits after each row's feed (the tokens past the `starts[r]` its cache holds)."""
        self.steps += 1
        logits = self._graphed(feeds, starts, pages)
        if logits is not None:
            self.graphed_steps += 1
            return logits
        q_lens = [len(f) for f in feeds]
        kv_lens = [s + n for s, n in zip(starts, q_lens)]
        device = self.model.layer_devices[0]
        meta = build_metadata(q_lens, kv_lens, pages, self.cache.page_size, device=device)
        ids = torch.tensor([t for f in feeds for t in f], dtype=torch.long)
        return self.model.forward(ids.to(device), meta, self.cache)

    def _graphed(self, feeds, starts, pages) -> torch.Tensor | None:
        """`_forward` from the draft's graphs of the longest feed's length: one token a row, or two where a row
        is two behind (every proposal of its last check accepted); None where a row feeds more (its prompt)
        or no graph fits."""
        graphs = self.graphs.get(max(len(f) for f in feeds))
        if graphs is None:
            return None
        return graphs.run([DecodeRow(f, s + len(f), p) for f, s, p in zip(feeds, starts, pages)])

    def accepted(self, job) -> None:
        """After the check: the draft cache's K/V are good up to the job's tokens but its last."""
        entry = self.state.get(id(job))
        if entry is not None:
            entry[2] = min(entry[2], len(job.all_ids) - 1)


def make_proposer(speculate: str | None, draft_model, draft_cache, target, num_draft_tokens: int,
                  max_ngram: int = defaults.NGRAM_MAX, target_cache=None):
    """The generator's proposer: None (no speculation), an NgramProposer or a DraftProposer."""
    if speculate is None and draft_model is not None:
        speculate = "draft"
    if speculate is None:
        return None
    if speculate not in defaults.SPECULATE_MODES:
        raise ConfigError(f"speculate={speculate!r} is not a proposer; use one of {', '.join(defaults.SPECULATE_MODES)}")
    if not isinstance(num_draft_tokens, int) or isinstance(num_draft_tokens, bool) or num_draft_tokens < 1:
        raise ConfigError(f"num_draft_tokens must be a positive integer, got {num_draft_tokens!r}")
    if speculate == "ngram":
        if draft_model is not None:
            raise ConfigError("speculate='ngram' proposes without a model: give either it or draft_model=, not both")
        if not isinstance(max_ngram, int) or isinstance(max_ngram, bool) or max_ngram < 1:
            raise ConfigError(f"max_ngram must be a positive integer, got {max_ngram!r}")
        return NgramProposer(max_ngram)
    if draft_model is None or draft_cache is None:
        raise ConfigError("speculate='draft' needs draft_model= and draft_cache= (a loaded smaller model and its cache)")
    if getattr(draft_cache, "model", draft_model) is not draft_model:
        raise ConfigError("draft_cache was made for another model: build it from the draft, "
                          "Cache(draft_model, max_seq_len=...)")
    if draft_cache is target_cache:
        raise ConfigError("draft_cache is the target's own cache: the draft needs a cache of its own, "
                          "Cache(draft_model, max_seq_len=...)")
    return DraftProposer(draft_model, draft_cache, target)
