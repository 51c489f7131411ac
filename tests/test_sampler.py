"""Tests for engine/sampler.py: filters, penalties, greedy, seeds and settings validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

from lowgear.errors import SamplingError
from lowgear.engine.sampler import Sampler, SamplerSettings, apply_penalties, sample


def draws(logits: torch.Tensor, s: SamplerSettings, n: int, seed: int = 0, history=()) -> torch.Tensor:
    """n draws from one row of logits, batched as n identical rows each with its own generator."""
    batch = logits.expand(n, -1).clone()
    gens = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(n)]
    return sample(batch, [s] * n, [list(history)] * n, gens)


# A crafted distribution: token probabilities 0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02 (sorted by id).
PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02])
LOGITS = PROBS.log()[None, :]


def test_settings_defaults_and_aliases():
    s = Sampler.Settings()
    assert isinstance(s, SamplerSettings)
    assert (s.temperature, s.top_k, s.top_p, s.min_p) == (0.8, 50, 0.8, 0.0)
    assert s.token_repetition_range == -1
    s.repetition_penalty = 1.2
    assert s.token_repetition_penalty == 1.2
    s2 = SamplerSettings(presence_penalty=0.5, frequency_penalty=0.25, temperature=1.0)
    assert s2.token_presence_penalty == 0.5 and s2.token_frequency_penalty == 0.25
    assert s2.presence_penalty == 0.5
    assert s2.clone() == s2 and s2.clone() is not s2
    with pytest.raises(SamplingError, match="unknown sampling parameter"):
        SamplerSettings(temprature=1.0)


def test_greedy_settings():
    g = SamplerSettings.greedy()
    assert g.is_greedy and g.validate() is g
    assert SamplerSettings(top_k=1).is_greedy


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": math.nan}, "temperature must be a finite number"),
        ({"temperature": "hot"}, "temperature must be a finite number"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"min_p": -0.1}, r"min_p must be in \[0, 1\)"),
        ({"min_p": 1.0}, r"min_p must be in \[0, 1\)"),
        ({"repetition_penalty": 0.0}, "token_repetition_penalty"),
        ({"token_repetition_penalty": -1.0}, "must be > 0"),
        ({"presence_penalty": math.inf}, "token_presence_penalty"),
        ({"frequency_penalty": None}, "token_frequency_penalty"),
        ({"token_repetition_range": -2}, "token_repetition_range"),
    ],
)
def test_validate_rejects_impossible_parameters(kwargs, match):
    s = SamplerSettings(**kwargs)
    with pytest.raises(SamplingError, match=match):
        s.validate()
    with pytest.raises(SamplingError):
        sample(LOGITS.clone(), [s], [[]], [None])


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 1000)
    for s in (SamplerSettings.greedy(), SamplerSettings(temperature=0.0), SamplerSettings(top_k=1, temperature=2.0)):
        out = sample(logits, [s] * 6, [[]] * 6, [None] * 6)
        assert torch.equal(out, logits.argmax(-1))


def test_temperature_zero_ignores_filters():
    s = SamplerSettings(temperature=0.0, top_k=3, top_p=0.1, min_p=0.5)
    assert draws(LOGITS, s, 20).tolist() == [0] * 20


def test_seeds_reproduce_and_differ():
    logits = torch.zeros(1, 500)  # uniform: draws are pure seed
    s = SamplerSettings(temperature=1.0, top_k=0, top_p=1.0)

    def run(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [int(sample(logits, [s], [[]], [g])) for _ in range(20)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_row_draw_independent_of_batch_mates():
    torch.manual_seed(1)
    logits = torch.randn(3, 300)
    s = [SamplerSettings(temperature=1.0, top_k=0, top_p=1.0), SamplerSettings(top_k=5), SamplerSettings()]
    alone = sample(logits[1:2], [s[1]], [[]], [torch.Generator().manual_seed(7)])
    batched = sample(logits, s, [[]] * 3, [torch.Generator().manual_seed(3), torch.Generator().manual_seed(7), None])
    assert int(alone) == int(batched[1])


def test_top_k_never_emits_excluded_and_reaches_all_allowed():
    out = draws(LOGITS, SamplerSettings(temperature=1.0, top_k=3, top_p=1.0), 2000)
    assert set(out.tolist()) == {0, 1, 2}


def test_top_p_keeps_smallest_set_reaching_p():
    # 0.4 + 0.25 = 0.65 < 0.7, so the third token is needed; 0.8 >= 0.7, so the fourth is not.
    out = draws(LOGITS, SamplerSettings(temperature=1.0, top_k=0, top_p=0.7), 2000)
    assert set(out.tolist()) == {0, 1, 2}
    # Exactly reaching p with the first two is enough.
    out = draws(LOGITS, SamplerSettings(temperature=1.0, top_k=0, top_p=0.65), 2000)
    assert set(out.tolist()) <= {0, 1, 2}  # float rounding of 0.4 + 0.25 may keep a third
    assert {0, 1} <= set(out.tolist())
    # A tiny top_p still keeps one token.
    out = draws(LOGITS, SamplerSettings(temperature=1.0, top_k=0, top_p=1e-6), 50)
    assert set(out.tolist()) == {0}


def test_min_p_drops_tokens_below_fraction_of_max():
    # max prob 0.4; min_p 0.3 -> threshold 0.12: tokens 0, 1, 2 (0.15) survive, 3 (0.1) does not.
    out = draws(LOGITS, SamplerSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.3), 2000)
    assert set(out.tolist()) == {0, 1, 2}


def test_filters_combine():
    s = SamplerSettings(temperature=1.0, top_k=5, top_p=0.95, min_p=0.2)  # min-p keeps 0..3
    out = draws(LOGITS, s, 2000)
    assert set(out.tolist()) == {0, 1, 2, 3}


def test_no_filters_can_emit_every_token():
    out = draws(LOGITS, SamplerSettings(temperature=1.0, top_k=0, top_p=1.0), 4000)
    assert set(out.tolist()) == set(range(7))
    freq = torch.bincount(out, minlength=7).float() / len(out)
    assert torch.allclose(freq, PROBS, atol=0.03)


def test_temperature_sharpens_distribution():
    hot = draws(LOGITS, SamplerSettings(temperature=5.0, top_k=0, top_p=1.0), 3000)
    cold = draws(LOGITS, SamplerSettings(temperature=0.2, top_k=0, top_p=1.0), 3000)
    assert (cold == 0).float().mean() > 0.9
    assert (hot == 0).float().mean() < 0.3


@hsettings(max_examples=40, deadline=None)
@given(
    vocab=st.integers(2, 40),
    top_k=st.integers(0, 45),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 0.99),
    temperature=st.floats(0.05, 3.0),
    seed=st.integers(0, 2**31),
)
def test_draw_always_in_allowed_set(vocab, top_k, top_p, min_p, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, vocab, generator=g) * 3
    s = SamplerSettings(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    out = draws(logits, s, 64, seed=seed % 1000)
    # Reference, in float64, over the sorted candidates.
    order = logits[0].double().argsort(descending=True)
    k = top_k if 0 < top_k < vocab else vocab
    probs = torch.softmax(logits[0].double()[order][:k] / temperature, -1)
    before = torch.cumsum(probs, -1) - probs
    allowed = set()
    for i in range(k):
        if (top_p >= 1 or before[i] < top_p + 1e-5) and probs[i] >= min_p * probs[0] - 1e-6:
            allowed.add(int(order[i]))
    assert set(out.tolist()) <= allowed


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    s = SamplerSettings(repetition_penalty=2.0)
    apply_penalties(logits, [s], [[0, 1, 1]])
    assert logits.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(1, 5)
    s = SamplerSettings(presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, [s], [[1, 1, 1, 3]])
    assert logits.tolist() == [[0.0, -1.25, 0.0, -0.75, 0.0]]


def test_repetition_range_limits_history():
    logits = torch.ones(1, 4)
    s = SamplerSettings(repetition_penalty=2.0, token_repetition_range=2)
    apply_penalties(logits, [s], [[0, 1, 2, 3, 3]])  # only the last two tokens (3, 3) count
    assert logits.tolist() == [[1.0, 1.0, 1.0, 0.5]]


def test_penalties_only_touch_their_rows():
    logits = torch.ones(3, 4)
    s = [SamplerSettings(), SamplerSettings(presence_penalty=1.0), SamplerSettings()]
    apply_penalties(logits, s, [[0, 1], [2], [3]])
    assert logits.tolist() == [[1.0] * 4, [1.0, 1.0, 0.0, 1.0], [1.0] * 4]


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    s = SamplerSettings(temperature=0.0, repetition_penalty=2.0)
    assert int(sample(logits, [s], [[0]], [None])) == 1
    assert logits.tolist() == [[3.0, 2.0, 1.0]]  # the caller's logits are untouched


def test_half_precision_logits_and_empty_batch():
    logits = LOGITS.half()
    out = sample(logits, [SamplerSettings(top_k=2)], [[]], [torch.Generator().manual_seed(0)])
    assert out.dtype == torch.long and int(out) in (0, 1)
    assert sample(torch.zeros(0, 5), [], [], []).shape == (0,)


def test_generator_on_wrong_device_is_reported():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to put the logits and the generator on different devices")
    g = torch.Generator()
    with pytest.raises(SamplingError, match="torch.Generator"):
        sample(LOGITS.cuda(), [SamplerSettings()], [[]], [g])


@pytest.mark.gpu
def test_sample_on_cuda_matches_shape_and_filters():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    logits = LOGITS.cuda().expand(256, -1).contiguous()
    gens = [torch.Generator(device="cuda").manual_seed(i) for i in range(256)]
    s = SamplerSettings(temperature=1.0, top_k=3, top_p=1.0)
    out = sample(logits, [s] * 256, [[0]] * 256, gens)
    assert out.device.type == "cuda" and set(out.tolist()) == {0, 1, 2}


def test_greedy_and_penalty_flags_exactly():
    from lowgear.engine.sampler import all_greedy

    g = SamplerSettings.greedy()
    assert (g.temperature, g.top_k, g.top_p, g.min_p) == (0.0, 1, 1.0, 0.0)
    assert SamplerSettings(temperature=0.0, top_k=50).is_greedy
    assert not SamplerSettings(temperature=1.0, top_k=0).is_greedy
    assert not SamplerSettings().has_penalties and not g.has_penalties
    for kw in (dict(token_repetition_penalty=1.1), dict(token_presence_penalty=0.5), dict(token_frequency_penalty=0.5)):
        assert SamplerSettings(**kw).has_penalties
        assert SamplerSettings(token_repetition_range=1, **kw).has_penalties
        assert not SamplerSettings(token_repetition_range=0, **kw).has_penalties
    # all greedy: the generator takes the argmax and may run the next decode step ahead
    assert all_greedy([g, SamplerSettings(temperature=0.0, top_k=50)])
    assert not all_greedy([g, SamplerSettings(temperature=1.0, top_k=0)])
    assert not all_greedy([SamplerSettings(temperature=0.0, token_repetition_penalty=1.2)])


def test_penalties_by_hand_across_rows_and_ranges():
    # vocab 4; row 0 plain, rows 1 and 2 penalized; ids outside the vocab (-1, 4) are ignored
    logits = torch.tensor([[1.0, 2.0, -2.0, 4.0]] * 3)
    plain = SamplerSettings(temperature=1.0)
    rep = SamplerSettings(temperature=1.0, token_repetition_penalty=2.0, token_repetition_range=10)
    freq = SamplerSettings(temperature=1.0, token_frequency_penalty=0.5, token_presence_penalty=0.25,
                           token_repetition_range=2)
    out = apply_penalties(logits.clone(), [plain, rep, freq], [[0, 1, 2], [0, 2, 4, -1], [3, 0, 3, 3]])
    assert out.tolist() == [
        [1.0, 2.0, -2.0, 4.0],  # no penalties: untouched
        [0.5, 2.0, -4.0, 4.0],  # range 10 > history: token 0 (first) counts; -2 * 2 = -4
        [1.0, 2.0, -2.0, 4.0 - 0.25 - 2 * 0.5],  # last 2 tokens only: token 3 twice, token 0 not seen
    ]
    assert sample(out, [SamplerSettings.greedy(), SamplerSettings.greedy(), SamplerSettings.greedy()]).tolist() == [3, 3, 3]


def test_all_greedy_by_top_k_one():
    from lowgear.engine.sampler import all_greedy

    assert all_greedy([SamplerSettings(temperature=1.0, top_k=1)])


def test_subnormal_top_p_keeps_the_top_token():
    """top_p = 5e-324 is 0 in float32: the top candidate must still be kept (it once kept none: index -1)."""
    logits = torch.tensor([[0.5, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 0.0]])
    rows = [SamplerSettings(temperature=1.0, top_p=5e-324), SamplerSettings(temperature=0.7, top_p=1e-300)]
    for seed in range(5):
        out = sample(logits, rows, generators=[torch.Generator().manual_seed(seed)] * 2)
        assert out.tolist() == [1, 0]


# ---------------------------------------------------------------- edges with hand-worked answers


def test_top_p_of_one_filters_nothing_even_where_float32_mass_reaches_one():
    """logits [30, 0, 0, 0]: the top token's float32 probability is 1.0, so the mass before every other
    token is 1.0 too; top_p = 1 (no filtering, as OpenAI and transformers mean it) must keep them
    anyway, each at e**-30 / (1 + 3 e**-30) ~ 9.4e-14 (a cut at `mass_before < 1` would zero them)."""
    from lowgear.engine.sampler import distribution

    p = distribution(torch.tensor([[30.0, 0.0, 0.0, 0.0]]), [SamplerSettings(temperature=1.0, top_p=1.0)])
    tail = math.exp(-30) / (1 + 3 * math.exp(-30))
    assert p[0, 1:].tolist() == pytest.approx([tail] * 3, rel=1e-3, abs=0)


def test_half_precision_logits_are_penalized_in_float32():
    """bfloat16 logits [1000, 992], token 0 seen, presence penalty 2: in float32 its logit becomes 998
    and p1 / p0 = e**-6; penalized in bfloat16 (a step of 4 at 1000) 998 would round to 996 or 1000,
    giving e**-4 or e**-8."""
    from lowgear.engine.sampler import distribution

    logits = torch.tensor([[1000.0, 992.0]], dtype=torch.bfloat16)
    p = distribution(logits, [SamplerSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, presence_penalty=2.0)], [[0]])
    assert float(p[0, 1] / p[0, 0]) == pytest.approx(math.exp(-6.0), rel=1e-4)


def test_unseeded_rows_draw_from_torchs_default_generator_and_seeded_rows_from_their_own():
    """A batch with an unseeded row and a seeded one: the unseeded row's uniform is torch.rand's next
    number after torch.manual_seed, the seeded row's its own generator's next, whatever sits beside it."""
    from lowgear.engine.sampler import _uniforms

    torch.manual_seed(123)
    want_default = torch.rand(1).item()
    want_own = torch.rand(1, generator=torch.Generator().manual_seed(7)).item()
    torch.manual_seed(123)
    u = _uniforms([None, torch.Generator().manual_seed(7)], torch.device("cpu"))
    assert u.tolist() == pytest.approx([want_default, want_own], abs=0)
