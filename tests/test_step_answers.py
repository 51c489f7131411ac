"""The step against answers written by hand, not the engine compared with itself: prefix reuse when a
later page of one prompt equals an earlier page of another, min_new_tokens and the end-of-job flush
of held-back text with rigged logits, the slot mapping and the causal / sliding masks, and the top-p
boundary with exactly representable probabilities."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

import lowgear as lg
from helpers import stub_config
from lowgear.attention.eager import causal_mask
from lowgear.attention.metadata import build_metadata, token_slots
from lowgear.attention.sdpa import padded_mask
from lowgear.cache.pages import PagePool
from lowgear.engine import sampler as sampler_module
from lowgear.engine.sampler import SamplerSettings, sample
from test_generator import make as make_generator, tiny_gguf  # noqa: F401  (the tiny model fixture)

PS = 16


def make(path, **kwargs):
    return make_generator(path, "eager", max_seq_len=1024, page_size=PS, **kwargs)


def pages(seed: int, n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 200, (PS,), generator=g).tolist() for _ in range(n)]


def greedy_job(ids, new=10):
    return lg.DynamicJob(ids, max_new_tokens=new, gen_settings=lg.Sampler.Settings.greedy())


def drive(gen, jobs, enqueue=True):
    if enqueue:
        gen.enqueue(jobs)
    results = []
    while any(not j.finished for j in jobs):
        results += gen.iterate()
    assert gen.pool.num_used == 0
    gen.pool.check()
    return {r["serial"]: r["cached_tokens"] for r in results}


# ---------------------------------------------------------------------------- prefix reuse
X, Y, Z, W = pages(11, 4)
TAIL = [7, 8, 9]
A = Y + X + Z + TAIL  # registers pages Y, YX, YXZ
B = X + W + TAIL  # its first page equals A's second, A's first differs: nothing may be reused
C = Y + X + W + TAIL  # Y, YX reused: 2 pages
D = Y + X + Z  # 48 tokens: the page holding the last prompt token is recomputed, so 2 pages, not 3
EXPECTED_REUSED = {"A": 0, "B": 0, "C": 2, "D": 2}


@pytest.fixture(scope="module")
def alone(tiny_gguf):
    """Each prompt's greedy tokens from a contiguous cache, where nothing is ever shared."""
    plain = make(tiny_gguf, max_batch_size=1, paged=False)
    out = {}
    for name, ids in dict(A=A, B=B, C=C, D=D).items():
        job = greedy_job(ids)
        drive(plain, [job])
        assert job.cached_prefix_tokens == 0
        out[name] = job.generated
    return out


def test_prefix_reuse_after_a_finished_job(tiny_gguf, alone):
    gen = make(tiny_gguf, max_batch_size=4)
    for name, ids in dict(A=A, B=B, C=C, D=D).items():
        job = greedy_job(ids)
        cached = drive(gen, [job])
        assert cached[job.serial] == EXPECTED_REUSED[name] * PS, name
        assert job.generated == alone[name], name


def test_prefix_reuse_while_the_prefix_is_being_prefilled(tiny_gguf, alone):
    gen = make(tiny_gguf, max_batch_size=4, max_chunk_size=24)  # A's prompt takes three steps
    jobs = dict(A=greedy_job(A), B=greedy_job(B), C=greedy_job(C), D=greedy_job(D))
    gen.enqueue(list(jobs.values()))
    gen.iterate()
    # C and D hold A's pages Y and YX from the start (in flight), so only A computes them
    assert jobs["C"].pages[:2] == jobs["A"].pages[:2] == jobs["D"].pages[:2]
    assert jobs["B"].pages[0] not in jobs["A"].pages
    cached = drive(gen, list(jobs.values()), enqueue=False)
    for name, job in jobs.items():
        assert cached[job.serial] == EXPECTED_REUSED[name] * PS, name
        assert job.generated == alone[name], name


# ---------------------------------------------------------------------------- rigged logits
VOCAB = 40
EOS = 0


class RiggedModel:
    """Logits whose argmax is `pick(last input token)`: EOS first, the next token id second."""

    loaded = True

    def __init__(self, pick):
        self.layer_devices = [torch.device("cpu")]
        self.config = stub_config(max_input_len=64, max_seq_len=None, no_cuda_graphs=True)
        self.pick = pick

    def forward(self, ids, meta, cache):
        last = ids[meta.logit_indices]
        logits = torch.zeros(len(last), VOCAB)
        for r, t in enumerate(last.tolist()):
            logits[r, self.pick(t)] = 10.0
            logits[r, (t + 1) % VOCAB] += 5.0
        return logits


class LetterTokenizer:
    stop_token_ids = {EOS}

    def token_bytes_table(self, decode_special_tokens=False):
        return [bytes([97 + i % 26]) for i in range(VOCAB)]  # token 21 is "v", 22 "w", 23 "x"


def rigged(pick, **kwargs):
    cache = SimpleNamespace(pool=PagePool(32, 4), page_size=4, capacity_tokens=128, allocated=True, contiguous=False)
    return lg.DynamicGenerator(RiggedModel(pick), cache, LetterTokenizer(), cuda_graphs=False, **kwargs)


@pytest.mark.parametrize("run_ahead", [False, True])
@pytest.mark.parametrize("min_new", [0, 1, 5])
def test_min_new_tokens_exactly(min_new, run_ahead):
    gen = rigged(lambda t: EOS, run_ahead=run_ahead)
    job = lg.DynamicJob([20], max_new_tokens=20, min_new_tokens=min_new, stop_conditions=[EOS],
                        gen_settings=lg.Sampler.Settings.greedy())
    drive(gen, [job])
    # EOS is the argmax every step: it is masked for exactly min_new tokens (the runner-up, last + 1, wins)
    assert job.generated == list(range(21, 21 + min_new)) + [EOS]
    assert job.eos_reason == "stop_token"


@pytest.mark.parametrize("run_ahead", [False, True])
def test_held_back_text_is_flushed_when_max_new_tokens_ends_the_job(run_ahead):
    gen = rigged(lambda t: (t + 1) % VOCAB, run_ahead=run_ahead)  # 20 -> 21 "v" -> 22 "w" -> 23 "x"
    job = lg.DynamicJob([20], max_new_tokens=3, stop_conditions=[EOS, "wxyz"], gen_settings=lg.Sampler.Settings.greedy())
    gen.enqueue(job)
    results = []
    while not job.finished:
        results += gen.iterate()
    assert [r["text"] for r in results] == ["v", "", "wx"]  # "w", "wx" held back: they may start "wxyz"
    assert results[-1]["eos_reason"] == "max_new_tokens" and results[-1]["full_completion"] == "vwx"


def test_stop_string_cuts_the_text():
    gen = rigged(lambda t: (t + 1) % VOCAB)
    job = lg.DynamicJob([20], max_new_tokens=10, stop_conditions=["xy"], gen_settings=lg.Sampler.Settings.greedy())
    drive(gen, [job])
    assert job.text == "vw" and job.eos_reason == "stop_string" and job.generated == [21, 22, 23, 24]


# ---------------------------------------------------------------------------- metadata and masks
def test_metadata_by_hand():
    # sequence 0: 3 new tokens at positions 2, 3, 4 (page 7 holds 0-3, page 2 holds 4-7);
    # sequence 1: one decode token at position 8 (page 6); page size 4
    meta = build_metadata([3, 1], [5, 9], [[7, 2], [4, 0, 6]], 4)
    assert meta.positions.tolist() == [2, 3, 4, 8]
    assert meta.slot_mapping.tolist() == [7 * 4 + 2, 7 * 4 + 3, 2 * 4 + 0, 6 * 4 + 0]
    assert meta.cu_q_lens.tolist() == [0, 3, 4]
    assert meta.kv_lens.tolist() == [5, 9]
    assert meta.block_tables.tolist() == [[7, 2, 0], [4, 0, 6]]
    assert meta.logit_indices.tolist() == [2, 3]
    assert (meta.max_q_len, meta.max_kv_len, meta.is_decode) == (3, 9, False)
    assert meta.to("cpu") is meta  # already there: no copy
    with pytest.raises(dataclasses.FrozenInstanceError):  # one step, one metadata: layers never change it
        meta.page_size = 8
    assert build_metadata([1, 1], [4, 5], [[3], [3, 5]], 4).is_decode
    every = build_metadata([3, 1], [5, 9], [[7, 2], [4, 0, 6]], 4, logits="all")
    assert every.logit_indices.tolist() == [0, 1, 2, 3]


def test_slots_at_page_boundaries():
    # the last slot of a page and the first of the next, for a 16-token page size
    assert token_slots([2], [17], [[5, 9]], 16) == ([15, 16], [5 * 16 + 15, 9 * 16 + 0])
    assert token_slots([1, 1], [16, 33], [[2], [1, 3, 8]], 16) == ([15, 32], [2 * 16 + 15, 8 * 16 + 0])


def test_causal_and_sliding_masks_by_hand():
    assert causal_mask(2, 4, None, "cpu").int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert causal_mask(3, 3, 2, "cpu").int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    meta = build_metadata([2, 1], [3, 4], [[0], [1]], 4)
    want = [
        [[1, 1, 0, 0], [1, 1, 1, 0]],  # positions 1, 2 of 3
        [[1, 1, 1, 1], [1, 1, 1, 1]],  # position 3 of 4; the padded row (position "4") sees every key
    ]
    assert padded_mask(meta, None, "cpu")[:, 0].int().tolist() == want
    windowed = [[[1, 1, 0, 0], [0, 1, 1, 0]], [[0, 0, 1, 1], [1, 0, 0, 1]]]  # padded row: key 0 added
    assert padded_mask(meta, 2, "cpu")[:, 0].int().tolist() == windowed


# ---------------------------------------------------------------------------- top-p boundary
@pytest.mark.parametrize("u, token", [(0.0, 0), (0.66, 0), (0.67, 1), (0.99, 1), (0.999999, 1)])
def test_top_p_boundary_exact(monkeypatch, u, token):
    # probabilities 0.5, 0.25, 0.125, 0.125 are exact in float32; top_p = 0.75 keeps tokens 0 and 1
    # (token 2's mass before it is exactly 0.75, not short of top_p), so u is scaled by 0.75:
    # below 0.5 / 0.75 token 0, above it token 1, never token 2 (it would be for u > 0.75 / 0.875).
    logits = torch.tensor([[3.0, 2.0, 1.0, 1.0]]) * math.log(2)
    monkeypatch.setattr(sampler_module, "_uniforms", lambda gens, device: torch.tensor([u]))
    s = SamplerSettings(temperature=1.0, top_k=0, top_p=0.75, min_p=0.0)
    assert sample(logits, [s]).tolist() == [token]


def test_top_p_just_above_the_boundary_keeps_the_third(monkeypatch):
    logits = torch.tensor([[3.0, 2.0, 1.0, 1.0]]) * math.log(2)
    monkeypatch.setattr(sampler_module, "_uniforms", lambda gens, device: torch.tensor([0.99]))
    s = SamplerSettings(temperature=1.0, top_k=0, top_p=0.76, min_p=0.0)
    # kept three candidates: 0.99 * 0.875 lies in the third's 0.75..0.875 (tokens 2 and 3 tie for third place)
    assert sample(logits, [s]).item() in (2, 3)


def test_cancel_reports_once_queued_or_running():
    gen = rigged(lambda t: (t + 1) % VOCAB, max_batch_size=1)
    running, queued = (lg.DynamicJob([20], max_new_tokens=5, gen_settings=lg.Sampler.Settings.greedy()) for _ in range(2))
    gen.enqueue([running, queued])
    gen.iterate()
    gen.cancel(queued)
    gen.cancel(running)
    gen.cancel(running)  # already ended: nothing more to report
    ended = [(r["job"], r["eos_reason"]) for r in gen.iterate() if r["eos"]]
    assert ended == [(queued, "cancelled"), (running, "cancelled")]
    assert gen.num_remaining_jobs() == 0 and gen.pool.num_used == 0


def test_min_p_boundary_exact(monkeypatch):
    # min_p 0.25 of the top 0.5 is 0.125: tokens 2 and 3 sit exactly on it and are kept
    logits = torch.tensor([[3.0, 2.0, 1.0, 1.0]]) * math.log(2)
    monkeypatch.setattr(sampler_module, "_uniforms", lambda gens, device: torch.tensor([0.99]))
    s = SamplerSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.25)
    assert sample(logits, [s]).item() in (2, 3)  # 0.99 lies in the last candidate's 0.875..1


def test_top_k_per_row_in_a_mixed_batch():
    # row 0 keeps one candidate (top_k 1 with a temperature: still its argmax), row 1 samples everything
    logits = torch.tensor([[0.0, 1.0, 0.9, 0.8]] * 2)
    one = SamplerSettings(temperature=1.0, top_k=1, top_p=1.0)
    every = SamplerSettings(temperature=1.0, top_k=0, top_p=1.0)
    picks = [sample(logits, [one, every], None, [torch.Generator().manual_seed(s)] * 2)[0].item() for s in range(40)]
    assert set(picks) == {1}
    two = SamplerSettings(temperature=1.0, top_k=2, top_p=1.0)
    picks = [sample(logits, [two, every], None, [torch.Generator().manual_seed(s)] * 2)[0].item() for s in range(80)]
    assert set(picks) == {1, 2}


def test_half_precision_logits_sample_like_float32():
    logits = torch.randn(32, 50, generator=torch.Generator().manual_seed(3)).half()
    s = SamplerSettings(temperature=0.7, top_k=20, top_p=0.9, token_repetition_penalty=1.3)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(32)]  # noqa: E731
    hist = [[1, 2, 3]] * 32
    assert sample(logits, [s] * 32, hist, gens()).tolist() == sample(logits.float(), [s] * 32, hist, gens()).tolist()


@pytest.mark.parametrize("u, top_p, token", [(0.5, 1.0, 1), (0.75, 1.0, 2), (1.0, 0.75, 1)])
def test_draw_on_a_cdf_boundary(monkeypatch, u, top_p, token):
    # cdf 0.5, 0.75, 0.875, 1: a draw exactly on a boundary belongs to the next token; a draw of 1
    # (rounding) still lands on the last kept candidate, never past it
    logits = torch.tensor([[3.0, 2.0, 1.5, 1.0]]) * math.log(2)
    logits[0, 2] = logits[0, 3] = math.log(2)  # keep the exact 0.5, 0.25, 0.125, 0.125
    monkeypatch.setattr(sampler_module, "_uniforms", lambda gens, device: torch.tensor([u]))
    s = SamplerSettings(temperature=1.0, top_k=0, top_p=top_p, min_p=0.0)
    assert sample(logits, [s]).item() in ((2, 3) if token == 2 else (token,))


def test_temperature_zero_row_in_a_sampled_batch_is_its_argmax():
    logits = torch.tensor([[0.0, 1.0, 0.9, 0.8]] * 2)
    cold = SamplerSettings(temperature=0.0, top_k=50, top_p=1.0)
    every = SamplerSettings(temperature=1.0, top_k=0, top_p=1.0)
    picks = [sample(logits, [cold, every], None, [torch.Generator().manual_seed(s)] * 2)[0].item() for s in range(40)]
    assert set(picks) == {1}


def test_unseeded_rows_draw_fresh_uniforms():
    torch.manual_seed(0)
    logits = torch.zeros(200, 2)  # 0.5 / 0.5
    s = SamplerSettings(temperature=1.0, top_k=0, top_p=1.0)
    ones = sample(logits, [s] * 200).sum().item()
    assert 60 < ones < 140
