"""`DynamicGenerator`: a job queue served by one batched forward per step.

Each `iterate()` admits queued jobs while there are batch slots and cache pages (a job reserves
the pages for its prompt plus max_new_tokens when it starts, so running jobs never run out),
builds one step mixing decode tokens and prefill chunks (at most `max_chunk_size` tokens), runs the
model once, samples for every job whose prompt is fully in the cache, and reports per-job text.
The generator owns scheduling; page bookkeeping is cache.pages' and tensors are the model's.
Prefix sharing: full pages are keyed by a hash chained over their tokens, so a job whose prompt
starts like an earlier one's shares those pages instead of recomputing them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from ..attention.metadata import build_metadata
from ..cache.pages import OutOfPages
from ..cache.prefix import page_key
from ..platform.dtypes import NonFiniteError, check_finite
from ..errors import ConfigError, ContextLengthError
from .graphs import DecodeGraphs, DecodeRow, disabled_reason
from .job import DynamicJob
from .sampler import SamplerSettings, all_greedy, sample
from .stops import StopMatcher
from .textstream import TextStream


@dataclass
class _Step:
    """A launched step: its (job, tokens computed) rows, the jobs it makes a token for, their logits,
    the chosen tokens and finite flags on the device and on their way to the host (None where no job
    makes a token)."""

    batch: list
    jobs: list
    picked: torch.Tensor | None
    tokens: torch.Tensor | None
    ok: torch.Tensor | None
    greedy: bool
    host: torch.Tensor | None  # [2, jobs]: tokens and finite flags, (being) copied to the host
    ready: object  # the CUDA event after that copy (None on the CPU)


class DynamicGenerator:
    def __init__(
        self,
        model,
        cache,
        tokenizer,
        paged: bool = True,
        max_batch_size: int = 16,
        max_chunk_size: int | None = None,
        max_q_size: int | None = None,  # accepted for ExLlamaV2 compatibility
        cuda_graphs: bool = True,  # capture decode steps on CUDA (ignored on the CPU)
        run_ahead: bool = True,  # launch a known next decode step before reading this one's tokens
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
        self.queue: deque[DynamicJob] = deque()
        self.running: list[DynamicJob] = []
        self.pending_results: list[dict] = []
        self.tokens_generated = 0
        self.steps = 0
        self.steps_ahead = 0
        self.run_ahead = run_ahead
        self._ahead: _Step | None = None  # a launched step whose tokens are not booked yet
        self._token_bytes = {
            False: tokenizer.token_bytes_table(decode_special_tokens=False),
            True: None,
        }
        self.graphs: DecodeGraphs | None = None
        self.graphs_off_reason = disabled_reason(model, cuda_graphs)
        if self.graphs_off_reason is None and (not paged or cache.contiguous):
            self.graphs_off_reason = "a contiguous cache has no spare page for padding rows"
        if self.graphs_off_reason is None:
            bound = min(cache.capacity_tokens, model.config.max_seq_len or cache.capacity_tokens)
            self.graphs = DecodeGraphs(model, cache, self.max_batch_size, bound)

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
        if job in self.queue:
            self.queue.remove(job)
        elif job in self.running:
            self._release(job)
            self.running.remove(job)
            if not self.running:
                self._ahead = None  # its rows are all ended jobs'
                if self.graphs is not None:
                    self.graphs.release_scratch()
        else:
            return
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
        }

    # ---------------------------------------------------------------- admission
    def _admit(self) -> None:
        while self.queue and len(self.running) < self.max_batch_size:
            job = self.queue[0]
            if not self._start(job):
                break  # wait for pages: keep arrival order
            self.queue.popleft()
            self.running.append(job)

    def _start(self, job: DynamicJob) -> bool:
        ps = self.page_size
        total_pages = -(-job.total_tokens_needed // ps)
        shared: list[int] = []
        keys: list[int] = []
        if self.paged:
            # Full pages of the prompt, less its last token: that one is always recomputed for its logits.
            prev = None
            for p in range((len(job.prompt_ids) - 1) // ps):
                prev = page_key(prev, job.prompt_ids[p * ps : (p + 1) * ps])
                keys.append(prev)
            shared = self.pool.lookup_prefix(keys)
        try:
            if shared:
                self.pool.share(shared)
            fresh = self.pool.allocate(total_pages - len(shared))
        except OutOfPages:
            if shared:
                self.pool.release(shared)
            return False
        job.pages = shared + fresh
        job.page_keys = keys[: len(shared)]
        job.computed = len(shared) * ps
        job.cached_prefix_tokens = job.computed
        job.rng = None
        if job.seed is not None:
            job.rng = torch.Generator(device=self.model.layer_devices[-1]).manual_seed(job.seed)
        table = self._token_bytes.get(job.decode_special_tokens)
        if table is None:
            table = self._token_bytes[True] = self.tokenizer.token_bytes_table(decode_special_tokens=True)
        job.stream = TextStream(table)
        job.matcher = StopMatcher(job.stop_strings)
        return True

    def _release(self, job: DynamicJob) -> None:
        if job.pages is not None:
            self.pool.release(job.pages)
            job.pages = None

    def _register_full_pages(self, job: DynamicJob) -> None:
        if not self.paged:
            return
        ps = self.page_size
        ids = job.all_ids
        while (len(job.page_keys) + 1) * ps <= job.computed:
            p = len(job.page_keys)
            prev = job.page_keys[-1] if job.page_keys else None
            key = page_key(prev, ids[p * ps : (p + 1) * ps])
            self.pool.register(job.pages[p], key)
            job.page_keys.append(key)

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
            self._admit()
            if not self.running:
                return results
            step = self._launch(self._plan())
        if self._can_run_ahead(step):
            try:
                self._ahead = self._run_ahead(step)
            except torch.OutOfMemoryError:  # (an eager fallback needs more memory than a graph replay)
                self._ahead = None  # this step's tokens still count; the next call plans its step as usual
        results += self._finish(step)
        self.running = [j for j in self.running if not j.finished]
        if self._ahead is not None and all(j.finished for j in self._ahead.jobs):
            self._ahead = None
        if not self.running and self.graphs is not None:
            self.graphs.release_scratch()  # an idle generator holds no page
        return results

    def _plan(self) -> list[tuple[DynamicJob, int]]:
        """(job, tokens to compute) for this step: decode tokens first, then prefill chunks in the budget."""
        budget = self.max_chunk_size
        batch: list[tuple[DynamicJob, int]] = []
        for job in self.running:  # decode tokens first: a long prompt never stalls running streams
            if len(job.all_ids) - job.computed == 1:
                batch.append((job, 1))
                budget -= 1
        for job in self.running:
            pending = len(job.all_ids) - job.computed
            if pending > 1 and budget > 0:
                chunk = min(pending, budget)
                batch.append((job, chunk))
                budget -= chunk
        return batch

    def _launch(self, batch: list[tuple[DynamicJob, int]]) -> _Step:
        """Queue the step's forward and its token choice on the device; nothing waits for the GPU."""
        logits = None
        if self.graphs is not None and all(n == 1 for _, n in batch):
            decode_rows = [DecodeRow(job.all_ids[job.computed], job.computed + 1, job.pages) for job, _ in batch]
            logits = self.graphs.run(decode_rows)  # None when no captured bucket fits
        if logits is None:
            input_ids: list[int] = []
            for job, n in batch:
                input_ids.extend(job.all_ids[job.computed : job.computed + n])
            logits = self._forward_eager(batch, torch.tensor(input_ids, dtype=torch.long))
        self.steps += 1
        rows = [row for row, (job, n) in enumerate(batch) if job.computed + n == len(job.all_ids)]
        return self._choose(batch, [batch[r][0] for r in rows], logits[rows] if len(rows) != logits.shape[0] else logits)

    def _run_ahead(self, step: _Step) -> _Step:
        """Launch the next decode step of `step`'s jobs, its input tokens `step`'s (still on the device)."""
        batch = [(job, 1) for job in step.jobs]
        logits = None
        if self.graphs is not None:
            logits = self.graphs.run([DecodeRow(0, job.computed + 2, job.pages) for job in step.jobs], ids=step.tokens)
        if logits is None:
            logits = self._forward_eager(batch, step.tokens, ahead=1)
        self.steps += 1
        self.steps_ahead += 1
        return self._choose(batch, step.jobs, logits, suppress=False)  # none under min_new_tokens

    def _choose(self, batch, jobs: list[DynamicJob], picked: torch.Tensor, suppress: bool = True) -> _Step:
        """The tokens of the jobs whose logits `picked` holds, as device tensors (see `_finish`)."""
        if not jobs:
            return _Step(batch, jobs, picked, None, None, True, None, None)
        if suppress:
            picked = self._suppress_early_stops(picked, jobs)
        # fp16 overflow shows as NaN/+inf logits (-inf alone is a masked token): a row's max is then
        # not finite (max propagates NaN), as it is when every logit is -inf. One reduction gives
        # the flags and, for greedy batches, the tokens; other batches sample rows made safe (zeros
        # where a row failed). Failed rows' jobs end; the flags come back in the tokens' transfer.
        top, best = picked.max(-1)
        ok = torch.isfinite(top)
        settings = [j.settings for j in jobs]
        greedy = all_greedy(settings)
        if greedy:
            tokens = best
        else:
            safe = torch.where(ok[:, None], picked, torch.zeros_like(picked))
            tokens = sample(safe, settings, [j.all_ids for j in jobs], [j.rng for j in jobs])
        # tokens and flags start for the host now, before a step run ahead is queued behind them
        both = torch.stack((tokens, ok.long()))
        event = None
        if both.is_cuda:
            host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
            host.copy_(both, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = both
        return _Step(batch, jobs, picked, tokens, ok, greedy, host, event)

    def _can_run_ahead(self, step: _Step) -> bool:
        """Whether the step after `step` is already known: the same running jobs, one greedy token each,
        none at its last token or still under min_new_tokens, and no queued job to admit first."""
        if not (self.run_ahead and step.jobs and step.greedy and not self.queue):
            return False
        if len(step.batch) != len(step.jobs) or {id(j) for j in step.jobs} != {id(j) for j in self.running}:
            return False
        return all(n == 1 for _, n in step.batch) and all(
            len(j.generated) + 2 <= j.max_new_tokens and len(j.generated) + 1 >= j.min_new_tokens for j in step.jobs)

    def _finish(self, step: _Step) -> list[dict]:
        """Book the step's tokens into its jobs (waiting for the GPU here) and report them."""
        results = []
        for job, n in step.batch:
            if not job.finished:  # a row of a run-ahead step whose job ended meanwhile is ignored
                job.computed += n
                self._register_full_pages(job)
        if not step.jobs:
            return results
        if step.ready is not None:
            step.ready.synchronize()  # this step's copy only, not a step queued after it
        values = step.host.T.tolist()
        for i, (job, (token, good)) in enumerate(zip(step.jobs, values)):
            if not job.finished:
                results.append(self._accept(job, token) if good else self._fail(job, step.picked[i]))
        return results

    def _forward_eager(self, batch: list[tuple[DynamicJob, int]], ids: torch.Tensor, ahead: int = 0) -> torch.Tensor:
        """Logits of the batch's last tokens; `ahead` positions past what the jobs have computed."""
        q_lens = [n for _, n in batch]
        kv_lens = [job.computed + ahead + n for job, n in batch]
        device = self.model.layer_devices[0]
        meta = build_metadata(q_lens, kv_lens, [job.pages for job, _ in batch], self.page_size, device=device)
        return self.model.forward(ids.to(device), meta, self.cache)

    def _suppress_early_stops(self, logits: torch.Tensor, jobs: list[DynamicJob]) -> torch.Tensor:
        early = [i for i, j in enumerate(jobs) if j.min_new_tokens and len(j.generated) < j.min_new_tokens and j.stop_tokens]
        if not early:
            return logits
        logits = logits.clone()
        for i in early:
            logits[i, sorted(jobs[i].stop_tokens)] = float("-inf")
        return logits

    def _fail(self, job: DynamicJob, logits: torch.Tensor) -> dict:
        """End one job whose logits are not finite, with the reason; the other jobs go on untouched."""
        try:
            check_finite(logits, f"the logits of job {job.serial}")
            message = f"job {job.serial}: logits not finite"
        except NonFiniteError as exc:
            message = str(exc)
        job.finished, job.eos_reason, job.error = True, "error", message
        self._release(job)
        result = self._result(job, "", [], eos=True)
        result["error"] = message
        return result

    def _accept(self, job: DynamicJob, token: int) -> dict:
        job.generated.append(token)
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
            self._release(job)
        return self._result(job, text, [token], eos=reason is not None)

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
            result["full_completion"] = job.text
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
        and capture the decode step of every batch-size bucket where CUDA graphs are on."""
        ids = list(range(1, 1 + min(8, self.cache.capacity_tokens // 4)))
        jobs = [DynamicJob(ids[: 3 + i], max_new_tokens=2, gen_settings=SamplerSettings.greedy()) for i in range(min(2, self.max_batch_size))]
        self.enqueue(jobs)
        while any(not j.finished for j in jobs):
            self.iterate()
        if self.graphs is not None:
            self.graphs.capture_all()
            if not self.running:
                self.graphs.release_scratch()


class Generator(DynamicGenerator):
    """A single stream over a contiguous cache: the simple generator of the seed's recipe."""

    def __init__(self, model, cache, tokenizer, **kwargs):
        kwargs.setdefault("paged", False)
        kwargs["max_batch_size"] = 1
        super().__init__(model, cache, tokenizer, **kwargs)
