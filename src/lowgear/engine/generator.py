"""`DynamicGenerator`: a job queue served by one batched forward per step.

Each `iterate()` admits queued jobs while there are batch slots and cache pages (a job reserves
the pages for its prompt plus max_new_tokens when it starts, so running jobs never run out),
builds one step mixing decode tokens and prefill chunks (at most `max_chunk_size` tokens), runs the
model once, samples for every job whose prompt is fully in the cache, and reports per-job text.
This class is the ExLlamaV2-compatible façade: intake, stop conditions, text and result dicts.
What runs when and on which pages is engine.scheduler's; executing a step is engine.runner's.
"""

from __future__ import annotations

import torch

from .. import defaults
from ..platform.dtypes import NonFiniteError, check_finite
from ..errors import ConfigError, ContextLengthError
from .graphs import DecodeGraphs, ScratchPage, disabled_reason, kv_bound
from .job import DynamicJob
from .runner import Runner, Step
from .sampler import SamplerSettings
from .scheduler import Scheduler
from .speculative import DraftProposer, make_proposer, verify
from .stops import StopMatcher
from .textstream import TextStream


class DynamicGenerator:
    def __init__(
        self,
        model,
        cache,
        tokenizer,
        paged: bool = True,
        max_batch_size: int = defaults.MAX_BATCH_SIZE,
        max_chunk_size: int | None = None,
        max_q_size: int | None = None,  # accepted for ExLlamaV2 compatibility
        cuda_graphs: bool = True,  # capture decode steps, speculative checks and draft steps on CUDA (not on the CPU)
        run_ahead: bool = True,  # launch a known next decode step before reading this one's tokens
        draft_model=None,  # speculative decoding with a smaller model sharing the tokenizer ...
        draft_cache=None,  # ... on its own cache
        num_draft_tokens: int = defaults.NUM_DRAFT_TOKENS,
        speculate: str | None = None,  # "ngram" (prompt lookup), "draft" (the default when draft_model is given)
        use_ngram_draft: bool = False,  # ExLlamaV2's name for speculate="ngram"
        max_ngram: int = defaults.NGRAM_MAX,  # the longest n-gram the lookup matches
        **_ignored,
    ):
        if not model.loaded:
            raise ConfigError("load the model first: model.load_autosplit(cache) before creating a generator")
        if not cache.allocated:
            cache.allocate()
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model, self.cache, self.tokenizer = model, cache, tokenizer
        self.paged = paged
        self.max_batch_size = max_batch_size if paged else 1
        self.max_chunk_size = max_chunk_size or model.config.max_input_len
        self.pool = cache.pool
        self.page_size = cache.page_size
        self.scheduler = Scheduler(self.pool, self.max_batch_size, self.max_chunk_size, paged=paged)
        self.pending_results: list[dict] = []
        self.tokens_generated = 0
        self.steps = 0
        self.steps_ahead = 0
        self.run_ahead = run_ahead
        self._ahead: Step | None = None  # a launched step whose tokens are not booked yet
        self._token_bytes = {
            False: tokenizer.token_bytes_table(decode_special_tokens=False),
            True: None,
        }
        self.graphs: DecodeGraphs | None = None  # the target's decode steps
        self.check_graphs: DecodeGraphs | None = None  # its steps that check proposals (k + 1 tokens a row)
        self.graphs_off_reason = disabled_reason(model, cuda_graphs, cache, paged)
        self.runner = Runner(model, cache)
        self.num_draft_tokens = num_draft_tokens
        if use_ngram_draft and speculate is None:
            speculate = "ngram"
        self.proposer = make_proposer(speculate, draft_model, draft_cache, model, num_draft_tokens, max_ngram,
                                      target_cache=cache)
        self.draft_graphs_off_reason = None
        if isinstance(self.proposer, DraftProposer):
            self.draft_graphs_off_reason = disabled_reason(draft_model, cuda_graphs, draft_cache)
        self.use_graphs(target=self.graphs_off_reason is None, draft=self.draft_graphs_off_reason is None)
        self.spec_proposed = 0  # proposed tokens checked, and of those accepted (server metrics read both)
        self.spec_accepted = 0

    def use_graphs(self, target: bool = True, draft: bool = True, captured: bool = True) -> None:
        """Run steps from static buffers (engine/graphs.py): the target's decode steps and, with a proposer,
        its checks of up to k proposals a row (q_len k + 1); a draft model's decode steps. captured=False
        runs the same static-buffer steps without capturing them (how the CPU tests take the graphed path)."""
        if target:
            scratch = ScratchPage(self.pool)  # the decode and check graphs pad into one page
            args = (self.model, self.cache, self.max_batch_size, kv_bound(self.model, self.cache))
            self.graphs = DecodeGraphs(*args, scratch=scratch, captured=captured)
            if self.proposer is not None:
                self.check_graphs = DecodeGraphs(*args, q_len=self.num_draft_tokens + 1, scratch=scratch,
                                                 captured=captured)
            self.runner.graphs, self.runner.check_graphs = self.graphs, self.check_graphs
        if draft and isinstance(self.proposer, DraftProposer):
            p = self.proposer
            args, scratch = (p.model, p.cache, self.max_batch_size, kv_bound(p.model, p.cache)), ScratchPage(p.cache.pool)
            # q_len 2: rows two tokens behind (their last check accepted every proposal) catch up in the same step
            p.graphs = {q: DecodeGraphs(*args, q_len=q, scratch=scratch, captured=captured) for q in (1, 2)}

    def _step_graphs(self) -> list[DecodeGraphs]:
        graphs = (self.graphs, self.check_graphs, *getattr(self.proposer, "graphs", {}).values())
        return [g for g in graphs if g is not None]

    def _release_scratch(self) -> None:
        """Give the graphs' scratch pages back (an idle generator holds no page)."""
        for graphs in self._step_graphs():
            graphs.release_scratch()

    @property
    def graphed_steps(self) -> int:
        """The target's steps run from its graphs (decode and check steps; a draft's are the proposer's)."""
        return sum(g.replays for g in (self.graphs, self.check_graphs) if g is not None)

    @property
    def model(self):
        return self._model

    @model.setter
    def model(self, model) -> None:  # the runner follows (tests swap in stub models)
        self._model = model
        if hasattr(self, "runner"):
            self.runner.model = model

    @property
    def queue(self):
        return self.scheduler.queue

    @property
    def running(self) -> list[DynamicJob]:
        return self.scheduler.running

    # ---------------------------------------------------------------- jobs
    def enqueue(self, job: DynamicJob | list[DynamicJob]) -> None:
        for j in job if isinstance(job, list) else [job]:
            need = j.total_tokens_needed
            if need > self.cache.capacity_tokens:
                raise ContextLengthError(
                    f"prompt of {len(j.prompt_ids)} tokens + max_new_tokens {j.max_new_tokens} = {need} tokens, "
                    f"more than the whole cache holds ({self.cache.capacity_tokens} tokens): shorten the prompt, "
                    f"ask for fewer new tokens, or build the Cache with a larger max_seq_len"
                )
            limit = self.model.config.max_seq_len
            if limit and need > limit:
                raise ContextLengthError(
                    f"prompt of {len(j.prompt_ids)} tokens + max_new_tokens {j.max_new_tokens} = {need} tokens "
                    f"exceeds the context length {limit}: shorten the prompt or ask for fewer new tokens"
                )
            self.queue.append(j)

    def cancel(self, job: DynamicJob) -> None:
        was_running = job in self.running
        if not self.scheduler.remove(job):
            return
        if was_running and not self.running:
            self._ahead = None  # its rows are all ended jobs'
            self._release_scratch()
        if self.proposer is not None:
            self.proposer.retain(self.running)
        job.finished, job.eos_reason = True, "cancelled"
        self.pending_results.append(self._result(job, "", [], eos=True))

    def num_remaining_jobs(self) -> int:
        return len(self.queue) + len(self.running)

    def num_active_jobs(self) -> int:
        return len(self.running)

    def stats(self) -> dict:
        return {
            "queued": len(self.queue),
            "running": len(self.running),
            "pages_in_use": self.pool.num_used,
            "pages_cached": self.pool.num_cached,
            "pages_total": self.pool.num_pages,
            "tokens_generated": self.tokens_generated,
            "steps": self.steps,
            "steps_ahead": self.steps_ahead,
            "spec_proposed": self.spec_proposed,
            "spec_accepted": self.spec_accepted,
        }

    # ---------------------------------------------------------------- admission
    def _on_start(self, job: DynamicJob) -> None:
        """A job the scheduler started: its random generator, text stream and stop matcher."""
        job.rng = None
        if job.seed is not None:
            job.rng = torch.Generator(device=self.model.layer_devices[-1]).manual_seed(job.seed)
        table = self._token_bytes.get(job.decode_special_tokens)
        if table is None:
            table = self._token_bytes[True] = self.tokenizer.token_bytes_table(decode_special_tokens=True)
        job.stream = TextStream(table)
        job.matcher = StopMatcher(job.stop_strings)

    # ---------------------------------------------------------------- one step
    def iterate(self) -> list[dict]:
        """Run one step; return the results (text chunks, finished jobs) it produced.

        A step's tokens reach the host only when it is finished. Where the next step is certain to
        be the same jobs decoding one token each (greedy, no queue, nothing the host must still decide
        about their logits), it is launched first, fed the tokens on the device (`_run_ahead`): the
        host then reads and checks this step's tokens while the GPU runs the next one. A job that
        this step ends (stop token, stop string, cancel) has its row of that step ignored, and a job
        queued meanwhile is admitted one call later than it would be otherwise.
        """
        results, self.pending_results = self.pending_results, []
        step, self._ahead = self._ahead, None
        if step is None:
            self.scheduler.admit(self._on_start)
            batch = self.scheduler.plan() if self.running else []
            if not batch:
                return results
            step = self._launch(self._propose(batch))
        if self._can_run_ahead(step):
            try:
                self._ahead = self._run_ahead(step)
            except torch.OutOfMemoryError:  # (an eager fallback needs more memory than a graph replay)
                self._ahead = None  # this step's tokens still count; the next call plans its step as usual
        results += self._finish(step)
        self.running[:] = [j for j in self.running if not j.finished]
        if self.proposer is not None:
            self.proposer.retain(self.running)
        if self._ahead is not None and all(j.finished for j in self._ahead.jobs):
            self._ahead = None
        if not self.running:
            self._release_scratch()  # an idle generator holds no page
        return results

    def _launch(self, batch) -> Step:
        self.steps += 1
        return self.runner.launch(batch)

    def _run_ahead(self, step: Step) -> Step:
        self.steps += 1
        self.steps_ahead += 1
        return self.runner.run_ahead(step)

    def _can_run_ahead(self, step: Step) -> bool:
        """Whether the step after `step` is already known: the same running jobs, one greedy token each,
        none at its last token or still under min_new_tokens, and no queued job to admit first."""
        if not (self.run_ahead and step.jobs and step.greedy and not self.queue and not step.spec):
            return False
        if any(j.constraint is not None for j in step.jobs):  # its mask needs this step's token on the host
            return False
        if self.proposer is not None and any(j.speculate for j in step.jobs):
            return False  # its next step checks a proposal, made from this step's tokens
        if len(step.batch) != len(step.jobs) or {id(j) for j in step.jobs} != {id(j) for j in self.running}:
            return False
        return all(n == 1 for _, n in step.batch) and all(
            len(j.generated) + 2 <= j.max_new_tokens and len(j.generated) + 1 >= j.min_new_tokens for j in step.jobs)

    def _finish(self, step: Step) -> list[dict]:
        """Book the step's tokens into its jobs (waiting for the GPU here) and report them."""
        results = []
        for job, n in step.batch:
            if not job.finished and not job.draft:  # a row of a run-ahead step whose job ended meanwhile is ignored
                self.scheduler.book(job, n)
        if step.jobs:
            values = self.runner.read(step)
            logprobs = self.runner.read_logprobs(step)
            for i, (job, (token, good)) in enumerate(zip(step.jobs, values)):
                if not job.finished:
                    results.append(self._accept(job, token, logprobs.get(i)) if good else self._fail(job, step.picked[i]))
        for job, logits in step.spec:
            results.append(self._check(job, logits))
        return results

    # ---------------------------------------------------------------- speculative decoding
    def _propose(self, batch):
        """Give each speculating decode row its proposal (job.draft): the row then computes 1 + k tokens."""
        if self.proposer is None:
            return batch
        jobs, ks = [], []
        for job, n in batch:
            k = min(self.num_draft_tokens, job.max_new_tokens - len(job.generated) - 1)
            if (n == 1 and len(job.all_ids) - job.computed == 1 and job.speculate and k > 0
                    and job.constraint is None and job.logprobs is None  # the check applies neither
                    and len(job.generated) >= job.min_new_tokens):
                jobs.append(job)
                ks.append(k)
        for job, (draft, q) in zip(jobs, self.proposer.propose(jobs, ks)):
            job.draft, job.draft_q = draft, q
        return [(job, n + len(job.draft)) for job, n in batch]

    def _check(self, job: DynamicJob, logits: torch.Tensor) -> dict:
        """Accept a prefix of the job's proposal and one token of the target's (engine/speculative.py).

        Each emitted token books the K/V of the token before it; those of rejected positions are
        left in the job's pages past `computed`, to be written over."""
        draft, q = job.draft, job.draft_q
        job.draft, job.draft_q = [], None
        tokens = verify(logits, draft, q, job.settings, job.all_ids, job.rng)
        if tokens is None:
            return self._fail(job, logits)
        job.spec_proposed += len(draft)
        job.spec_accepted += len(tokens) - 1
        self.spec_proposed += len(draft)
        self.spec_accepted += len(tokens) - 1
        results = []
        for token in tokens:
            self.scheduler.book(job, 1)
            results.append(self._accept(job, token))
            if job.finished:
                break
        self.proposer.accepted(job)
        result = results[-1]
        result["text"] = "".join(r["text"] for r in results)
        result["token_ids"] = [t for r in results for t in r["token_ids"]]
        return result

    def _fail(self, job: DynamicJob, logits: torch.Tensor) -> dict:
        """End one job whose logits are not finite, with the reason; the other jobs go on untouched."""
        try:
            check_finite(logits, f"the logits of job {job.serial}")
            message = f"job {job.serial}: logits not finite"
        except NonFiniteError as exc:
            message = str(exc)
        grammar = job.constraint is not None and job.constraint.error()
        if grammar:  # finite logits, every token masked: the grammar allowed none
            message = f"job {job.serial}: {grammar}"
        job.finished, job.eos_reason, job.error = True, "error", message
        self.scheduler.release(job)
        result = self._result(job, "", [], eos=True)
        result["error"] = message
        result["grammar_error"] = bool(grammar)
        return result

    def _accept(self, job: DynamicJob, token: int, logprobs=None) -> dict:
        job.generated.append(token)
        if job.constraint is not None:
            job.constraint.accept(token)
        self.tokens_generated += 1
        text, reason = "", None
        if token in job.stop_tokens:
            reason = "stop_token"
            text = self._drain(job)
        else:
            emit, stopped = job.matcher.push(job.stream.push(token))
            text = emit
            if stopped:
                reason = "stop_string"
            elif len(job.generated) >= job.max_new_tokens:
                reason = "max_new_tokens"
                text += self._drain(job)
        job.text += text
        if reason is not None:
            job.finished, job.eos_reason = True, reason
            self.scheduler.release(job)
        result = self._result(job, text, [token], eos=reason is not None)
        if logprobs is not None:
            chosen, top = logprobs
            result["logprobs"] = [(token, chosen, top[: job.logprobs])]
        return result

    @staticmethod
    def _drain(job: DynamicJob) -> str:
        """The text still held by the UTF-8 stream and the stop matcher, at the end of a job."""
        emit, stopped = job.matcher.push(job.stream.flush())
        return emit if stopped else emit + job.matcher.flush()

    def _result(self, job: DynamicJob, text: str, token_ids: list[int], eos: bool) -> dict:
        result = {
            "job": job,
            "identifier": job.identifier,
            "serial": job.serial,
            "stage": "streaming",
            "text": text,
            "token_ids": token_ids,
            "eos": eos,
            "new_tokens": len(job.generated),
            "prompt_tokens": len(job.prompt_ids),
            "cached_tokens": job.cached_prefix_tokens,
        }
        if eos:
            result["eos_reason"] = job.eos_reason
            if job.eos_reason == "stop_string":
                result["stop_string"] = job.matcher.matched
            result["full_completion"] = job.text
            if job.spec_proposed:
                result["spec_proposed"], result["spec_accepted"] = job.spec_proposed, job.spec_accepted
                result["acceptance_rate"] = job.spec_accepted / job.spec_proposed
        return result

    # ---------------------------------------------------------------- conveniences
    def generate(
        self,
        prompt: str | list[str],
        max_new_tokens: int = 200,
        gen_settings: SamplerSettings | list[SamplerSettings] | None = None,
        stop_conditions=None,
        seed: int | None = None,
        add_bos: bool = False,
        encode_special_tokens: bool = False,
        decode_special_tokens: bool = False,
        completion_only: bool = False,
        min_new_tokens: int = 0,
        **sampler_kwargs,
    ) -> str | list[str]:
        """Generate for one prompt or a list (run together as a batch), ExLlamaV2's keyword arguments."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        jobs = []
        for i, text in enumerate(prompts):
            settings = gen_settings[i] if isinstance(gen_settings, list) else gen_settings
            jobs.append(
                self._make_job(text, max_new_tokens, settings, stop_conditions, seed, add_bos,
                               encode_special_tokens, decode_special_tokens, min_new_tokens, sampler_kwargs, identifier=i)
            )
        self.enqueue(jobs)
        while any(not j.finished for j in jobs):
            self.iterate()
        outs = [j.text if completion_only else p + j.text for p, j in zip(prompts, jobs)]
        return outs[0] if isinstance(prompt, str) else outs

    def stream(self, prompt: str, max_new_tokens: int = 200, gen_settings=None, stop_conditions=None, seed=None,
               add_bos: bool = False, encode_special_tokens: bool = False, decode_special_tokens: bool = False,
               min_new_tokens: int = 0, **sampler_kwargs):
        """Yield the completion of one prompt as text chunks, as they are generated."""
        job = self._make_job(prompt, max_new_tokens, gen_settings, stop_conditions, seed, add_bos,
                             encode_special_tokens, decode_special_tokens, min_new_tokens, sampler_kwargs)
        self.enqueue(job)
        try:
            while not job.finished:
                for r in self.iterate():
                    if r["job"] is job and r["text"]:
                        yield r["text"]
        finally:
            if not job.finished:
                self.cancel(job)

    def _make_job(self, text, max_new_tokens, settings, stop_conditions, seed, add_bos, encode_special_tokens,
                  decode_special_tokens, min_new_tokens, sampler_kwargs, identifier=None) -> DynamicJob:
        if settings is None:
            settings = SamplerSettings(**sampler_kwargs) if sampler_kwargs else SamplerSettings()
        elif sampler_kwargs:
            raise ConfigError("give sampler settings either as gen_settings or as keyword arguments, not both")
        ids = self.tokenizer.encode(text, add_bos=add_bos, encode_special_tokens=encode_special_tokens)
        if stop_conditions is None:
            stop_conditions = sorted(self.tokenizer.stop_token_ids)
        return DynamicJob(ids, max_new_tokens=max_new_tokens, gen_settings=settings, stop_conditions=stop_conditions,
                          seed=seed, identifier=identifier, decode_special_tokens=decode_special_tokens,
                          min_new_tokens=min_new_tokens)

    def warmup(self) -> None:
        """Run a small batch through every path the generator uses (prefill, mixed, decode, sampling),
        and capture the steps of every batch-size bucket where CUDA graphs are on (decode; with a proposer,
        checks; with a draft model, its decode steps)."""
        ids = list(range(1, 1 + min(8, self.cache.capacity_tokens // 4)))
        jobs = [DynamicJob(ids[: 3 + i], max_new_tokens=2, gen_settings=SamplerSettings.greedy()) for i in range(min(2, self.max_batch_size))]
        self.enqueue(jobs)
        while any(not j.finished for j in jobs):
            self.iterate()
        for graphs in self._step_graphs():
            graphs.capture_all()
        if not self.running:
            self._release_scratch()


class Generator(DynamicGenerator):
    """A single stream over a contiguous cache (ExLlamaV2's simple generator)."""

    def __init__(self, model, cache, tokenizer, **kwargs):
        kwargs.setdefault("paged", False)
        kwargs["max_batch_size"] = 1
        super().__init__(model, cache, tokenizer, **kwargs)
