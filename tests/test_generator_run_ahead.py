"""Running ahead: a known next decode step is launched (its tokens fed on the device) before the host
reads this step's tokens. It must change nothing a caller sees: the same tokens, texts, end reasons
and results per iterate() call as a generator that never runs ahead, through stop tokens, cancels
and min_new_tokens, with every page given back; a job that arrives while a step is ahead starts one
call later, and still gets the same tokens. Reference: the same generator with
run_ahead=False (the sequential path, itself checked against prompts run alone in test_generator.py),
both on the CPU (test_generator.make), where a row's logits do not depend on the batch it is in: a
step run ahead can still hold the row of a job that has just ended.
"""

from __future__ import annotations

import pytest
import torch
from test_generator import make, prompts, tiny_gguf  # noqa: F401 (a fixture)

import lowgear as lg


def _jobs(ids, max_new, stops=None, min_new=0):
    return [lg.DynamicJob(p, max_new_tokens=max_new + i, gen_settings=lg.Sampler.Settings.greedy(),
                          stop_conditions=None if stops is None else [stops[i]], min_new_tokens=min_new)
            for i, p in enumerate(ids)]


def _drive(gen, jobs, cancel_at=None, arrive=()):
    """Iterate to the end; returns the per-call result summaries (what a caller of iterate() sees)."""
    late = [jobs[i] for i in arrive]
    gen.enqueue([j for j in jobs if j not in late])
    seen, calls = [], 0
    while any(not j.finished for j in jobs):
        out = gen.iterate()
        seen.append(sorted((r["serial"] - jobs[0].serial, tuple(r["token_ids"]), r["eos"], r.get("eos_reason"))
                           for r in out))
        calls += 1
        if calls == 3 and cancel_at is not None:
            gen.cancel(jobs[cancel_at])
        if calls == 4 and late:
            gen.enqueue(late)
    assert gen.pool.num_used == 0, "pages still held after every job finished"
    gen.pool.check()
    return seen


@pytest.mark.parametrize("rung", ["eager", "triton"])
def test_run_ahead_changes_nothing_a_caller_sees(tiny_gguf, rung):
    ids = prompts(5)
    base = make(tiny_gguf, rung, run_ahead=False, max_batch_size=4)
    plain = _jobs(ids, 12)
    _drive(base, plain)
    # stop each job on its 5th token (greedy, so the same token comes again); job 2 never stops early
    stops = [j.generated[4] if i != 2 else 0 for i, j in enumerate(plain)]
    scenarios = [dict(), dict(cancel_at=1), dict(arrive=(3, 4)), dict(min_new=6)]
    ahead_gen = make(tiny_gguf, rung, max_batch_size=4)
    for kw in scenarios:
        min_new = kw.pop("min_new", 0)
        want_jobs, got_jobs = _jobs(ids, 12, stops, min_new), _jobs(ids, 12, stops, min_new)
        want = _drive(base, want_jobs, **kw)
        got = _drive(ahead_gen, got_jobs, **kw)
        if "arrive" not in kw:  # a job queued while a step is ahead starts one call later; else the same calls
            assert got == want, kw
        assert [j.generated for j in got_jobs] == [j.generated for j in want_jobs]
        assert [j.eos_reason for j in got_jobs] == [j.eos_reason for j in want_jobs]
        assert [j.text for j in got_jobs] == [j.text for j in want_jobs]
    assert base.steps_ahead == 0
    assert ahead_gen.steps_ahead > 0 and ahead_gen.stats()["steps_ahead"] == ahead_gen.steps_ahead


def test_no_run_ahead_for_sampled_jobs(tiny_gguf):
    gen = make(tiny_gguf, "eager", max_batch_size=4)
    jobs = [lg.DynamicJob(p, max_new_tokens=8, gen_settings=lg.Sampler.Settings(temperature=0.8, top_k=20), seed=7)
            for p in prompts(3)]
    _drive(gen, jobs)
    assert gen.steps_ahead == 0 and all(len(j.generated) == 8 for j in jobs)


def test_a_step_run_ahead_that_runs_out_of_memory_loses_nothing(tiny_gguf, monkeypatch):
    ids = prompts(3)
    want_jobs, got_jobs = _jobs(ids, 10), _jobs(ids, 10)
    want = _drive(make(tiny_gguf, "eager", run_ahead=False, max_batch_size=4), want_jobs)
    gen = make(tiny_gguf, "eager", max_batch_size=4)
    real, calls = gen._run_ahead, []

    def flaky(step):
        calls.append(1)
        if len(calls) in (2, 3):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(step)

    monkeypatch.setattr(gen, "_run_ahead", flaky)
    assert _drive(gen, got_jobs) == want
    assert [j.generated for j in got_jobs] == [j.generated for j in want_jobs]
    assert len(calls) > 3 and gen.steps_ahead == len(calls) - 2
