"""The engine's per-job hooks for structured output and logprobs: a grammar's mask touches its own
row only, a free job beside it is unchanged and costs no mask work, a grammar with no way on ends
that job alone; logprobs come from the unmasked logits."""

from __future__ import annotations

import math

import pytest
import torch

import lowgear as lg
from lowgear.engine.runner import apply_constraints, token_logprobs

from test_generator import make, prompts, tiny_gguf  # noqa: F401  (the fixture)


class OnlyThese:
    """A stand-in grammar: allows a fixed set of tokens (none: a dead end)."""

    def __init__(self, allowed: set[int]):
        self.ids = sorted(allowed)
        self.calls = 0
        self.accepted: list[int] = []

    def allowed(self, width: int) -> torch.Tensor:
        self.calls += 1
        mask = torch.zeros(width, dtype=torch.bool)
        mask[self.ids] = True
        return mask

    def accept(self, token: int) -> None:
        self.accepted.append(token)

    def error(self):
        return None if self.ids else "the grammar allows nothing here"


def greedy_job(ids, n=6, **kw):
    return lg.DynamicJob(ids, max_new_tokens=n, gen_settings=lg.Sampler.Settings.greedy(), **kw)


def finish(gen, jobs):
    gen.enqueue(jobs)
    while not all(j.finished for j in jobs):
        gen.iterate()


def test_a_constraint_masks_its_row_only(tiny_gguf):
    gen = make(tiny_gguf)
    a, b = prompts(2)
    alone = greedy_job(b)
    finish(gen, [alone])
    grammar = OnlyThese({7, 11, 13})
    constrained, free = greedy_job(a, constraint=grammar), greedy_job(b)
    finish(gen, [constrained, free])
    assert set(constrained.generated) <= {7, 11, 13}
    assert grammar.accepted == constrained.generated
    assert grammar.calls == len(constrained.generated)  # one mask per token of its own, no more
    assert free.generated == alone.generated


def test_no_constrained_row_means_no_mask_work():
    logits = torch.randn(3, 10)
    jobs = [greedy_job([1]) for _ in range(3)]
    assert apply_constraints(logits, jobs) is logits  # not even a copy


def test_a_dead_end_grammar_ends_its_job_alone(tiny_gguf):
    gen = make(tiny_gguf)
    a, b = prompts(2, seed=1)
    alone = greedy_job(b)
    finish(gen, [alone])
    stuck, free = greedy_job(a, constraint=OnlyThese(set())), greedy_job(b)
    finish(gen, [stuck, free])
    assert stuck.eos_reason == "error" and "the grammar allows nothing here" in stuck.error
    assert free.generated == alone.generated
    assert gen.pool.num_used == 0


def test_logprobs_are_of_the_raw_logits():
    """Hand-made logits: the logprob of a masked row's token is the unmasked distribution's."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    jobs = [greedy_job([1], logprobs=2), greedy_job([1])]
    rows, chosen, values, ids = token_logprobs(logits, torch.tensor([2, 0]), jobs)
    z = math.log(sum(math.exp(x) for x in (2.0, 1.0, 0.0, -1.0)))
    assert rows == [0]
    assert chosen.tolist() == pytest.approx([0.0 - z], abs=1e-6)
    assert ids.tolist() == [[0, 1]] and values.tolist()[0] == pytest.approx([2.0 - z, 1.0 - z], abs=1e-6)


def test_a_dead_end_is_the_requests_4xx_not_a_server_error():
    """The server answers a grammar dead end with a 422 naming it, never a 5xx."""
    import asyncio

    from lowgear.server.engine import Engine, JobHandle
    from lowgear.server.jobs import _server_error

    async def route():
        engine = Engine(None, None, model_name="m", max_seq_len=8)
        sink = asyncio.Queue()
        handle = JobHandle(engine, None, 0, sink, asyncio.get_running_loop(), prompt_tokens=1)
        engine._active[handle.id] = handle
        engine._route({"identifier": handle.id, "eos": True, "eos_reason": "error", "grammar_error": True,
                       "error": "job 1: the grammar allows nothing here", "token_ids": []})
        return await asyncio.wait_for(sink.get(), 5)

    err = _server_error(asyncio.run(route()))
    assert err.status == 422 and "the grammar allows nothing here" in err.message


@pytest.mark.gpu
def test_on_a_gpu_with_graphs_a_constraint_touches_its_row_only(tmp_path):
    """CUDA graphs and run-ahead on: a constrained row beside a free one; the free row's tokens equal
    those it makes beside an unconstrained twin (same batch shape), its logprobs are reported."""
    from lowgear.bench.synthetic import write_gguf

    path = write_gguf(tmp_path / "m.gguf", arch="llama", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=512, qtype="Q4_0", seed=5)
    config = lg.Config(path)
    config.devices, config.dtype = ["0"], "float16"
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=1024, page_size=16)
    model.load_autosplit(cache)
    gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=lg.Tokenizer(config), max_batch_size=4)
    assert gen.graphs is not None, gen.graphs_off_reason
    a, b = prompts(2, seed=2)
    twin, free = greedy_job(a, n=12), greedy_job(b, n=12)
    finish(gen, [twin, free])
    grammar = OnlyThese({7, 11, 13})
    constrained, free2 = greedy_job(a, n=12, constraint=grammar), greedy_job(b, n=12, logprobs=2)
    results = []
    gen.enqueue([constrained, free2])
    while not all(j.finished for j in (constrained, free2)):
        results += gen.iterate()
    assert set(constrained.generated) <= {7, 11, 13} and grammar.calls == 12
    assert free2.generated == free.generated
    reported = [e for r in results if r["job"] is free2 for e in r.get("logprobs", [])]
    assert [t for t, _, _ in reported] == free2.generated
    assert all(lp <= 0 and len(top) == 2 and top[0][1] >= lp - 1e-3 for _, lp, top in reported)


def test_constrained_and_logprob_jobs_do_not_speculate(tiny_gguf):
    """The speculative check applies no grammar mask and reports no logprobs, so a job with either never
    takes a proposal: its tokens obey its grammar and its logprobs cover every token, while a free job
    beside it does speculate (a proposer that always offers two tokens)."""
    gen = make(tiny_gguf, speculate="ngram")
    gen.proposer.propose = lambda jobs, ks: [([7, 11][:k], None) for k in ks]
    a = prompts(1, seed=3)[0]
    grammar = OnlyThese({7, 11, 13})
    constrained = greedy_job(a, n=8, constraint=grammar)
    counted = greedy_job(a, n=8, logprobs=1)
    free = greedy_job(a, n=8)
    results = []
    gen.enqueue([constrained, counted, free])
    while not all(j.finished for j in (constrained, counted, free)):
        results += gen.iterate()
    assert constrained.spec_proposed == 0 and counted.spec_proposed == 0
    assert set(constrained.generated) <= {7, 11, 13} and grammar.accepted == constrained.generated
    reported = [t for r in results if r["job"] is counted for t, _, _ in r.get("logprobs", [])]
    assert reported == counted.generated
    assert free.spec_proposed > 0
