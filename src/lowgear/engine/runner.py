"""`Runner`: executes a scheduled step on the model and queues its token choice on the device.

It builds the step's metadata (attention.metadata.build_metadata; graphed steps stage the same
positions and slots through engine.graphs: pure decode steps, and steps whose rows check proposals
of up to k tokens, padded to k+1 a row), runs `model.forward` or a captured graph, and
hands the logits of the jobs that make a token to sampling (engine.sampler). Nothing here waits
for the GPU until `read`: the chosen tokens and their finite flags travel to the host together,
so a next pure-greedy decode step can be launched (`run_ahead`) before this one's tokens are read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..attention.metadata import build_metadata
from .graphs import DecodeRow
from .sampler import all_greedy, sample


@dataclass
class Step:
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
    logprobs: tuple | None = None  # (rows, chosen [r], top values [r, k], top ids [r, k]) for jobs that ask
    spec: list = field(default_factory=list)  # (job, logits [k+1, V]) of each job checking a proposal


class Runner:
    def __init__(self, model, cache, graphs=None, check_graphs=None):
        self.model, self.cache = model, cache
        self.graphs = graphs  # engine.graphs.DecodeGraphs: pure decode steps
        self.check_graphs = check_graphs  # the same with q_len = k + 1: steps that check proposals
        self.page_size = cache.page_size

    def launch(self, batch: list[tuple[object, int]]) -> Step:
        """Queue the step's forward and its token choice on the device; nothing waits for the GPU."""
        counts = [n if job.draft else 1 for job, n in batch]  # logits rows: a speculating job's k+1, else its last
        logits = self.graphed(batch, counts)
        if logits is None:
            input_ids = [t for job, n in batch for t in row_tokens(job, n)]
            logits = self.forward_eager(batch, torch.tensor(input_ids, dtype=torch.long), logits=counts)
        spec = []
        if len(counts) != logits.shape[0]:
            ends = torch.tensor(counts).cumsum(0).tolist()
            spec = [(job, logits[e - n : e]) for (job, n), e in zip(batch, ends) if job.draft]
            logits = logits[[e - 1 for e in ends]]
        rows = [row for row, (job, n) in enumerate(batch) if not job.draft and job.computed + n == len(job.all_ids)]
        step = self.choose(batch, [batch[r][0] for r in rows], logits[rows] if len(rows) != logits.shape[0] else logits)
        step.spec = spec
        return step

    def graphed(self, batch: list[tuple[object, int]], counts: list[int]) -> torch.Tensor | None:
        """The step's logits (`counts` rows a job) from a graph: pure decode steps from the decode graphs,
        steps with proposals to check from the check graphs; None where none fits (it then runs eagerly)."""
        if self.graphs is not None and all(n == 1 for _, n in batch):
            return self.graphs.run([DecodeRow(job.all_ids[job.computed], job.computed + 1, job.pages) for job, _ in batch])
        if self.check_graphs is not None and any(job.draft for job, _ in batch):
            rows = [DecodeRow(row_tokens(job, n), job.computed + n, job.pages) for job, n in batch]
            return self.check_graphs.run(rows, counts=counts)
        return None

    def run_ahead(self, step: Step) -> Step:
        """Launch the next decode step of `step`'s jobs, its input tokens `step`'s (still on the device)."""
        batch = [(job, 1) for job in step.jobs]
        logits = None
        if self.graphs is not None:
            logits = self.graphs.run([DecodeRow(0, job.computed + 2, job.pages) for job in step.jobs], ids=step.tokens)
        if logits is None:
            logits = self.forward_eager(batch, step.tokens, ahead=1)
        return self.choose(batch, step.jobs, logits, suppress=False)  # none under min_new_tokens

    def forward_eager(self, batch: list[tuple[object, int]], ids: torch.Tensor, ahead: int = 0,
                      logits: str | list[int] = "last") -> torch.Tensor:
        """Logits of the batch's last tokens (`logits`: as build_metadata takes it); `ahead` positions
        past what the jobs have computed."""
        q_lens = [n for _, n in batch]
        kv_lens = [job.computed + ahead + n for job, n in batch]
        device = self.model.layer_devices[0]
        meta = build_metadata(q_lens, kv_lens, [job.pages for job, _ in batch], self.page_size, device=device,
                              logits=logits)
        return self.model.forward(ids.to(device), meta, self.cache)

    def choose(self, batch, jobs: list, picked: torch.Tensor, suppress: bool = True) -> Step:
        """The tokens of the jobs whose logits `picked` holds, as device tensors (see `read`)."""
        if not jobs:
            return Step(batch, jobs, picked, None, None, True, None, None)
        raw = picked
        if suppress:
            picked = suppress_early_stops(picked, jobs)
        picked = apply_constraints(picked, jobs)
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
        logprobs = token_logprobs(raw, tokens, jobs)
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
        return Step(batch, jobs, picked, tokens, ok, greedy, host, event, logprobs)

    @staticmethod
    def read(step: Step) -> list[list[int]]:
        """[token, finite flag] per job of the step, waiting for this step's copy only."""
        if step.ready is not None:
            step.ready.synchronize()
        return step.host.T.tolist()

    @staticmethod
    def read_logprobs(step: Step) -> dict[int, tuple[float, list[tuple[int, float]]]]:
        """Per job index of the step that asked: (its token's logprob, [(token id, logprob)] best first)."""
        if step.logprobs is None:
            return {}
        rows, chosen, values, ids = step.logprobs
        chosen, values, ids = chosen.tolist(), values.tolist(), ids.tolist()
        return {r: (chosen[i], list(zip(ids[i], values[i]))) for i, r in enumerate(rows)}


def row_tokens(job, n: int) -> list[int]:
    """The n tokens a job feeds this step (a speculating job's row: its last token and its proposal, job.draft)."""
    return (job.all_ids + job.draft)[job.computed : job.computed + n]


def suppress_early_stops(logits: torch.Tensor, jobs: list) -> torch.Tensor:
    """Mask the stop tokens of jobs still under min_new_tokens (a copy; `logits` is left as it is)."""
    early = [i for i, j in enumerate(jobs) if j.min_new_tokens and len(j.generated) < j.min_new_tokens and j.stop_tokens]
    if not early:
        return logits
    logits = logits.clone()
    for i in early:
        logits[i, sorted(jobs[i].stop_tokens)] = float("-inf")
    return logits


def apply_constraints(logits: torch.Tensor, jobs: list) -> torch.Tensor:
    """Mask, for each job with a `constraint` (structured output), the tokens its grammar forbids now.

    Only constrained rows cost anything: a batch with none returns `logits` as it is; otherwise a
    copy with -inf outside each constrained row's allowed set (`constraint.allowed(vocab)`, a bool
    tensor on the host). A row whose grammar allows nothing becomes all -inf, which `choose` flags
    as not finite, so that job alone ends with an error (the generator asks the constraint why)."""
    rows = [i for i, j in enumerate(jobs) if getattr(j, "constraint", None) is not None]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    allowed = torch.stack([jobs[i].constraint.allowed(vocab) for i in rows]).to(logits.device, non_blocking=True)
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return logits


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, jobs: list):
    """Log-probabilities for the jobs that ask (`job.logprobs`: how many alternatives, 0 for none).

    Taken from the model's own logits, before penalties, temperature, filters and grammar masks (the
    distribution the model gives, as vLLM's default "raw" logprobs): the chosen token's value and the
    `k` most likely tokens, k the largest any row asks (each row keeps its own count when read)."""
    rows = [i for i, j in enumerate(jobs) if getattr(j, "logprobs", None) is not None]
    if not rows:
        return None
    index = torch.tensor(rows, device=logits.device)
    lp = torch.log_softmax(logits[index].float(), dim=-1)
    chosen = lp.gather(-1, tokens[index][:, None]).squeeze(-1)
    k = max(jobs[i].logprobs for i in rows)
    values, ids = lp.topk(k, dim=-1)
    return rows, chosen, values, ids
