"""`DynamicJob`: one request's state: prompt, settings, stop conditions, pages, output so far."""

from __future__ import annotations

import itertools
import time

import torch

from ..errors import ConfigError
from .sampler import SamplerSettings

_serials = itertools.count()


class DynamicJob:
    def __init__(
        self,
        input_ids,
        max_new_tokens: int,
        gen_settings: SamplerSettings | None = None,
        stop_conditions=None,
        seed: int | None = None,
        identifier=None,
        decode_special_tokens: bool = False,
        min_new_tokens: int = 0,
        logprobs: int | None = None,
        constraint=None,
        speculate: bool = True,  # False: never propose tokens, whatever the generator's proposer
        **_ignored,
    ):
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() == 2:
                if input_ids.shape[0] != 1:
                    raise ConfigError("a DynamicJob takes one sequence: input_ids of shape [1, n]")
                input_ids = input_ids[0]
            input_ids = input_ids.tolist()
        self.prompt_ids: list[int] = [int(t) for t in input_ids]
        if not self.prompt_ids:
            raise ConfigError("empty prompt: a job needs at least one input token (add_bos=True gives one)")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.settings = gen_settings if gen_settings is not None else SamplerSettings()
        self.settings.validate()
        self.stop_tokens: set[int] = set()
        self.stop_strings: list[str] = []
        for cond in stop_conditions or []:
            if isinstance(cond, str):
                if cond:
                    self.stop_strings.append(cond)
            elif isinstance(cond, int):
                self.stop_tokens.add(cond)
            else:
                raise ConfigError(f"stop condition {cond!r} is neither a token id nor a string")
        if logprobs is not None and (not isinstance(logprobs, int) or logprobs < 0):
            raise ConfigError(f"logprobs must be None or a count >= 0 of alternatives per token, got {logprobs!r}")
        self.logprobs = logprobs  # None: off; k: each token's logprob and its k most likely alternatives
        # structured output: an object with allowed(vocab) -> bool tensor [vocab] of the tokens its
        # grammar allows next, accept(token) after each token, and error() -> why nothing is allowed
        self.constraint = constraint
        self.seed = seed
        self.identifier = identifier
        self.decode_special_tokens = decode_special_tokens
        self.serial = next(_serials)
        self.time_enqueued = time.time()
        # filled by the generator
        self.generated: list[int] = []
        self.computed = 0  # tokens of prompt_ids + generated whose K/V are in the cache
        self.pages: list[int] | None = None  # the block table (seq.page_ids) while running
        self.seq = None  # cache.pages.SequencePages, set by the scheduler
        self.borrowed_end = 0  # tokens covered by pages shared at start (the scheduler's)
        self.rng: torch.Generator | None = None
        self.text = ""
        self.stream = None
        self.matcher = None
        self.finished = False
        self.eos_reason: str | None = None
        self.error: str | None = None  # set when eos_reason is "error" (e.g. fp16 overflow)
        self.cached_prefix_tokens = 0
        self.speculate = speculate
        self.draft: list[int] = []  # tokens proposed for this step (engine/speculative.py)
        self.draft_q: torch.Tensor | None = None  # the proposer's probabilities for them (None: a point mass)
        self.spec_proposed = 0
        self.spec_accepted = 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def total_tokens_needed(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens

    def __repr__(self) -> str:
        return f"DynamicJob(serial={self.serial}, prompt={len(self.prompt_ids)} tokens, generated={len(self.generated)})"
