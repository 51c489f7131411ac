"""Turning a batch of logits into next tokens.

`SamplerSettings` holds one request's sampling parameters under ExLlamaV2's attribute names (with
the OpenAI names as aliases), so `lg.Sampler.Settings()` recipes carry over. `sample()` takes the
logits of a batch [B, V] and one settings object, one token history and one generator per row,
and returns the drawn tokens [B]. The order is fixed: penalties (repetition, presence, frequency),
temperature, top-k, top-p, min-p, then one draw. A row with temperature 0 takes the argmax.

Every row is processed in one vectorized pass whatever its settings: the filters are prefixes of
the logits sorted in descending order, so each row keeps its first `n_keep` sorted candidates and
the draw is an inverse-CDF lookup with a uniform number from that row's own generator. A row's
draw therefore depends only on its logits, its settings and its generator, never on which other
rows share the batch, so a seed reproduces a completion however requests are batched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch

from ..errors import SamplingError

# OpenAI / Hugging Face names accepted for ExLlamaV2's.
_ALIASES = {
    "repetition_penalty": "token_repetition_penalty",
    "presence_penalty": "token_presence_penalty",
    "frequency_penalty": "token_frequency_penalty",
    "repetition_range": "token_repetition_range",
}


@dataclass(init=False)
class SamplerSettings:
    temperature: float = 0.8
    top_k: int = 50  # 0: off
    top_p: float = 0.8  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    token_repetition_penalty: float = 1.0  # 1.0: off
    token_presence_penalty: float = 0.0
    token_frequency_penalty: float = 0.0
    token_repetition_range: int = -1  # how many recent tokens the penalties look at; -1: all

    def __init__(self, **kwargs: float) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)
        for name, value in kwargs.items():
            name = _ALIASES.get(name, name)
            if name not in {f.name for f in fields(self)}:
                known = ", ".join(sorted([f.name for f in fields(self)] + list(_ALIASES)))
                raise SamplingError(f"unknown sampling parameter {name!r}; known parameters: {known}")
            setattr(self, name, value)

    @classmethod
    def greedy(cls) -> "SamplerSettings":
        """Settings that always take the most likely token."""
        return cls(temperature=0.0, top_k=1, top_p=1.0, min_p=0.0)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.token_repetition_penalty != 1.0
            or self.token_presence_penalty != 0.0
            or self.token_frequency_penalty != 0.0
        ) and self.token_repetition_range != 0

    def validate(self) -> "SamplerSettings":
        """Raise SamplingError naming the first impossible parameter; return self when all are fine."""
        _number(self.temperature, "temperature")
        if self.temperature < 0:
            raise SamplingError(
                f"temperature must be >= 0, got {self.temperature}; use 0 for greedy decoding, "
                "1 for the model's own distribution"
            )
        _integer(self.top_k, "top_k")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0, got {self.top_k}; use 0 to turn top-k off")
        _number(self.top_p, "top_p")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}; use 1.0 to turn top-p off")
        _number(self.min_p, "min_p")
        if not 0 <= self.min_p < 1:
            raise SamplingError(f"min_p must be in [0, 1), got {self.min_p}; use 0.0 to turn min-p off")
        _number(self.token_repetition_penalty, "token_repetition_penalty")
        if self.token_repetition_penalty <= 0:
            raise SamplingError(
                f"token_repetition_penalty (repetition_penalty) must be > 0, got "
                f"{self.token_repetition_penalty}; use 1.0 for no penalty, values a little above 1 "
                "(such as 1.1) to discourage repeats"
            )
        _number(self.token_presence_penalty, "token_presence_penalty (presence_penalty)")
        _number(self.token_frequency_penalty, "token_frequency_penalty (frequency_penalty)")
        _integer(self.token_repetition_range, "token_repetition_range")
        if self.token_repetition_range < -1:
            raise SamplingError(
                f"token_repetition_range must be -1 (the whole history) or >= 0, "
                f"got {self.token_repetition_range}"
            )
        return self

    def clone(self) -> "SamplerSettings":
        return SamplerSettings(**{f.name: getattr(self, f.name) for f in fields(self)})


def _alias(name: str) -> property:
    def get(self: SamplerSettings) -> float:
        return getattr(self, name)

    def set_(self: SamplerSettings, value: float) -> None:
        setattr(self, name, value)

    return property(get, set_, doc=f"Alias of {name}.")


for _alias_name, _field_name in _ALIASES.items():
    setattr(SamplerSettings, _alias_name, _alias(_field_name))


def _number(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SamplingError(f"{name} must be a finite number, got {value!r}")


def _integer(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingError(f"{name} must be an integer, got {value!r}")


def apply_penalties(
    logits: torch.Tensor, settings: Sequence[SamplerSettings], histories: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Penalize the tokens each row has already seen, in place on `logits` [B, V]; returns it.

    Repetition (ExLlamaV2 / CTRL): a seen token's logit is divided by the penalty when positive
    and multiplied by it when negative. Presence and frequency (OpenAI): subtract
    presence * [count > 0] + frequency * count. All three look at the last
    `token_repetition_range` tokens of the history (-1: all of it).
    """
    rows = [b for b, s in enumerate(settings) if s.has_penalties]
    if not rows:
        return logits
    num_rows, vocab = len(rows), logits.shape[1]
    parts = []
    for r, b in enumerate(rows):
        rng = settings[b].token_repetition_range
        history = histories[b] if rng < 0 else histories[b][max(len(histories[b]) - rng, 0) :]
        ids = torch.as_tensor(history, dtype=torch.long).flatten().cpu()
        parts.append(ids[(ids >= 0) & (ids < vocab)] + r * vocab)
    device = logits.device
    index = torch.cat(parts).to(device, non_blocking=True)
    counts = torch.bincount(index, minlength=num_rows * vocab).view(num_rows, vocab).to(logits.dtype)
    seen = counts > 0

    def column(attr: str) -> torch.Tensor:  # [num_rows, 1]
        return torch.tensor([getattr(settings[b], attr) for b in rows], dtype=logits.dtype, device=device)[:, None]

    rep = column("token_repetition_penalty")
    sub = logits[rows]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - column("token_presence_penalty") * seen.to(logits.dtype) - column("token_frequency_penalty") * counts
    logits[rows] = sub
    return logits


def all_greedy(settings: Sequence[SamplerSettings]) -> bool:
    """Whether every row's pick is its argmax: greedy (temperature 0 or top_k 1) with no penalties."""
    return all(s.temperature == 0 or s.top_k == 1 for s in settings) and not any(s.has_penalties for s in settings)


def sample(
    logits: torch.Tensor,
    settings: Sequence[SamplerSettings],
    histories: Sequence[Sequence[int]] | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Draw one token per row of `logits` [B, V]; returns a LongTensor [B] on the logits' device.

    `histories[b]` is row b's previous tokens (prompt included), read by the penalties;
    `generators[b]` is row b's torch.Generator (on the logits' device), or None for torch's default.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    batch, vocab = logits.shape
    histories = histories if histories is not None else [()] * batch
    generators = generators if generators is not None else [None] * batch
    if not len(settings) == len(histories) == len(generators) == batch:
        raise ValueError(
            f"sample() needs one settings, history and generator per row: {batch} rows, "
            f"{len(settings)} settings, {len(histories)} histories, {len(generators)} generators"
        )
    for s in settings:
        s.validate()
    if batch == 0:
        return torch.empty(0, dtype=torch.long, device=logits.device)
    device = logits.device
    if all_greedy(settings):
        # Every row greedy: the argmax is the whole answer (one kernel, no sort, no draw), and it
        # consumes no random numbers, so nothing later in a seeded stream depends on it.
        return logits.argmax(dim=-1)
    indices, probs, n_keep, greedy = _candidates(logits, settings, histories)
    cdf = torch.cumsum(probs, dim=-1)  # [B, K]
    u = _uniforms(generators, device)  # [B]
    target = (u[:, None] * cdf[:, -1:]).contiguous()
    choice = torch.searchsorted(cdf.contiguous(), target, right=True)
    choice = torch.minimum(choice, n_keep - 1)
    choice = torch.where(greedy > 0, torch.zeros_like(choice), choice)
    return indices.gather(-1, choice).squeeze(-1)


def _candidates(logits: torch.Tensor, settings: Sequence[SamplerSettings], histories: Sequence[Sequence[int]]):
    """Each row's candidates after penalties and filters: (token ids [B, K], their unnormalized kept
    probabilities [B, K] (0 where filtered out), kept count [B, 1], greedy flags [B, 1])."""
    batch, vocab = logits.shape
    device = logits.device
    x = logits.float().clone() if logits.dtype != torch.float32 else logits.clone()  # [B, V]
    apply_penalties(x, settings, histories)

    # Candidates: only as many of the top logits as the widest top-k needs (all when one row has none).
    top_ks = [s.top_k if 0 < s.top_k < vocab else vocab for s in settings]
    width = max(top_ks)
    values, indices = torch.topk(x, width, dim=-1, sorted=True)  # [B, K], descending

    # Per-row parameters as one [B, 5] host-to-device copy: greedy, temperature, top_k, top_p, min_p.
    params = torch.tensor(
        [
            [
                float(s.temperature == 0),
                s.temperature if s.temperature > 0 else 1.0,
                float(k),
                s.top_p if s.top_p < 1 else math.inf,
                s.min_p,
            ]
            for s, k in zip(settings, top_ks)
        ],
        dtype=torch.float32,
        device=device,
    )
    greedy, temperature, top_k, top_p, min_p = (params[:, i : i + 1] for i in range(5))  # each [B, 1]
    position = torch.arange(width, device=device)[None, :]  # [1, K]
    keep = position < top_k
    probs = torch.softmax((values / temperature).masked_fill(~keep, -math.inf), dim=-1)
    # top-p: keep a candidate while the mass before it is still short of top_p (so >= 1 survives).
    mass_before = torch.cumsum(probs, dim=-1).roll(1, dims=-1)
    mass_before[:, 0] = 0.0
    keep &= mass_before < top_p
    keep[:, 0] = True  # the top candidate, also where top_p rounds to 0 in float32 (a subnormal top_p)
    keep &= probs >= min_p * probs[:, :1]
    n_keep = keep.sum(dim=-1, keepdim=True)  # [B, 1], >= 1: the top candidate always survives
    return indices, probs * keep, n_keep, greedy


def distribution(
    logits: torch.Tensor,
    settings: Sequence[SamplerSettings],
    histories: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """The probabilities [B, V] (float32) `sample` draws row b's token from: a one-hot argmax for a greedy row.

    Speculative decoding's acceptance test reads them (engine/speculative.py)."""
    batch, vocab = logits.shape
    histories = histories if histories is not None else [()] * batch
    out = torch.zeros(batch, vocab, dtype=torch.float32, device=logits.device)
    indices, probs, _, greedy = _candidates(logits, settings, histories)
    probs = torch.where(greedy > 0, (torch.arange(probs.shape[1], device=probs.device) == 0).float(), probs)
    return out.scatter_(1, indices, probs / probs.sum(dim=-1, keepdim=True))


def _uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One uniform number in [0, 1) per row, each from its row's generator."""
    out = torch.empty(len(generators), dtype=torch.float32, device=device)
    default_rows = [b for b, g in enumerate(generators) if g is None]
    if default_rows:
        out[default_rows] = torch.rand(len(default_rows), device=device)
    for b, g in enumerate(generators):
        if g is None:
            continue
        same_index = g.device.index is None or device.index is None or g.device.index == device.index
        if g.device.type != device.type or not same_index:
            raise SamplingError(
                f"row {b}'s torch.Generator is on {g.device} but the logits are on {device}; "
                f"create it with torch.Generator(device={str(device)!r})"
            )
        out[b : b + 1] = torch.rand(1, generator=g, device=device)
    return out


class Sampler:
    """ExLlamaV2-shaped namespace: `Sampler.Settings()` is a `SamplerSettings`."""

    Settings = SamplerSettings
    sample = staticmethod(sample)
