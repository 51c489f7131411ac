"""DynamicGenerator on every CPU rung: batching, arrivals mid-generation, chunked prefill, prefix
sharing and page accounting. Reference: each prompt run alone, greedy, on the eager rung."""

from __future__ import annotations

import os

import pytest
import torch

import lowgear as lg
from lowgear.errors import ConfigError, ContextLengthError

RUNGS = ["eager", "sdpa", "triton"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from lowgear.bench.synthetic import write_gguf

    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_gguf(path, arch="llama", hidden_size=96, num_layers=2, num_heads=6, num_kv_heads=2,
               intermediate_size=96, qtype="Q8_0", seed=3)
    return str(path)


def make(path, rung="eager", max_seq_len=2048, page_size=16, **gen_kwargs):
    """A generator on the CPU, even on a GPU machine: there a row's float16 logits depend on the batch
    it is in (the GPU twin of these tests, test_gpu_end_to_end.py, allows partings at near ties)."""
    if rung == "triton" and torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("the triton rung runs on the CPU only in the interpreter (CI); on a GPU machine "
                    "test_generator_graphs_gpu.py and test_gpu_end_to_end.py cover it")
    config = lg.Config(path)
    config.attn_backend, config.devices = rung, ["cpu"]
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=max_seq_len, page_size=page_size)
    model.load_autosplit(cache)
    tokenizer = lg.Tokenizer(config)
    return lg.DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer, **gen_kwargs)


def prompts(n, vocab=200, seed=0, lengths=(5, 17, 16, 33, 1, 40, 9, 64)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def run(gen, jobs_ids, max_new=10, arrive_late=(), late_after=3):
    jobs = [lg.DynamicJob(ids, max_new_tokens=max_new, gen_settings=lg.Sampler.Settings.greedy()) for ids in jobs_ids]
    early = [j for i, j in enumerate(jobs) if i not in arrive_late]
    gen.enqueue(early)
    steps = 0
    while any(not j.finished for j in jobs):
        gen.iterate()
        steps += 1
        if steps == late_after:
            gen.enqueue([jobs[i] for i in arrive_late])
    assert gen.pool.num_used == 0, "pages still held after every job finished"
    gen.pool.check()
    return [j.generated for j in jobs]


def runs_alone(path, ids):
    """Each prompt's greedy tokens, run by itself on an unpaged one-sequence eager generator (what batched runs
    must give), and the prompts."""
    gen = make(path, "eager", max_batch_size=1, paged=False)
    return ids, [run(gen, [p])[0] for p in ids]


def run_batched(path, rung, ids):
    """(generator, tokens) of `ids` batched on `rung` in chunks of 12, the third prompt arriving after two steps."""
    gen = make(path, rung, max_batch_size=len(ids), max_chunk_size=12)
    assert gen.model.selections["cpu"].backend.name == rung
    return gen, run(gen, ids, arrive_late=(2,), late_after=2)


@pytest.fixture(scope="module")
def reference(tiny_gguf):
    return runs_alone(tiny_gguf, prompts(6))


@pytest.mark.parametrize("rung", RUNGS)
def test_batch_equals_alone(tiny_gguf, reference, rung):
    ids, alone = reference
    gen = make(tiny_gguf, rung, max_batch_size=len(ids))
    assert gen.model.selections["cpu"].backend.name == rung
    assert run(gen, ids) == alone


@pytest.mark.parametrize("rung", RUNGS)
def test_arrivals_mid_generation_and_chunked_prefill(tiny_gguf, reference, rung):
    ids, alone = reference
    gen = make(tiny_gguf, rung, max_batch_size=4, max_chunk_size=12)  # prompts of 17..40 tokens go in chunks
    assert run(gen, ids, arrive_late=(1, 3, 5), late_after=2) == alone


def test_jobs_wait_for_pages_and_start_when_freed(tiny_gguf, reference):
    ids, alone = reference
    # 8 pages of 16 tokens: at most two of these jobs fit at once
    gen = make(tiny_gguf, "eager", max_seq_len=128, page_size=16, max_batch_size=6)
    assert run(gen, ids) == alone


def test_prefix_sharing_allocates_shared_pages_once(tiny_gguf):
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(3, 200, (600,), generator=g).tolist()
    a = prefix + torch.randint(3, 200, (7,), generator=g).tolist()
    b = prefix + torch.randint(3, 200, (11,), generator=g).tolist()
    plain = make(tiny_gguf, "eager", max_seq_len=4096, page_size=256, max_batch_size=1, paged=False)
    expected = [run(plain, [a], max_new=8)[0], run(plain, [b], max_new=8)[0]]

    gen = make(tiny_gguf, "eager", max_seq_len=4096, page_size=256, max_batch_size=2)
    job_a = lg.DynamicJob(a, max_new_tokens=8, gen_settings=lg.Sampler.Settings.greedy())
    gen.enqueue(job_a)
    while job_a.computed < len(a):
        gen.iterate()
    used_a = gen.pool.num_used
    job_b = lg.DynamicJob(b, max_new_tokens=8, gen_settings=lg.Sampler.Settings.greedy())
    gen.enqueue(job_b)
    gen.iterate()
    assert job_b.cached_prefix_tokens == 512  # two full 256-token pages found by their hash chain
    # b needs ceil((611 + 8) / 256) = 3 pages; 2 of them are a's, so only 1 more page is taken.
    assert gen.pool.num_used == used_a + 1
    while not (job_a.finished and job_b.finished):
        gen.iterate()
    assert [job_a.generated, job_b.generated] == expected
    assert gen.pool.num_used == 0
    gen.pool.check()


def test_job_larger_than_cache_is_rejected(tiny_gguf):
    gen = make(tiny_gguf, "eager", max_seq_len=64, page_size=16)
    with pytest.raises(ContextLengthError, match="more than the whole cache"):
        gen.enqueue(lg.DynamicJob(list(range(3, 63)), max_new_tokens=10))
    assert gen.num_remaining_jobs() == 0


def test_cancel_frees_pages(tiny_gguf):
    gen = make(tiny_gguf, "eager", max_batch_size=4)
    jobs = [lg.DynamicJob(p, max_new_tokens=50, gen_settings=lg.Sampler.Settings.greedy()) for p in prompts(3)]
    gen.enqueue(jobs)
    gen.iterate()
    gen.iterate()
    assert gen.pool.num_used > 0
    for j in jobs:
        gen.cancel(j)
    results = gen.iterate()
    assert {r["eos_reason"] for r in results if r["eos"]} == {"cancelled"}
    assert gen.pool.num_used == 0
    gen.pool.check()


def test_bad_job_parameters(tiny_gguf):
    with pytest.raises(ConfigError):
        lg.DynamicJob([1, 2, 3], max_new_tokens=0)
    with pytest.raises(ConfigError):
        lg.DynamicJob([], max_new_tokens=4)
    with pytest.raises(lg.errors.SamplingError):
        lg.DynamicJob([1, 2], max_new_tokens=4, gen_settings=lg.Sampler.Settings(temperature=-1.0))
