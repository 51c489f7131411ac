"""The OpenAI request shapes the server accepts, validated before anything reaches the generator.

Each endpoint's body is a pydantic model with OpenAI's names and ranges; lowgear's extensions
(`top_k`, `min_p`) sit beside them. Fields that OpenAI defines but that change nothing here
(`user`, `metadata`, ...) are accepted and ignored; unknown fields are rejected, as OpenAI does, so a
misspelt `temprature` is a 400 instead of a silently ignored setting. `APIError` carries an HTTP
status and OpenAI's error body; `format_validation_error` turns pydantic's report into one message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The sampler compares top_p in float32, where a top_p below ~1.4e-45 (JSON allows 5e-324) is 0 and
# keeps no token at all (engine/sampler.py: an index -1 error). Any top_p this small keeps only the
# most likely token, as the floor does.
MAX_STOP_STRINGS = 4
MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs (its /v1/completions allows 5; vLLM 20 on both)


class APIError(Exception):
    """An error the server answers with, in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def format_validation_error(errors: list[dict]) -> tuple[str, str | None]:
    """One readable message (and the first offending parameter) from pydantic's error list."""
    parts = []
    first_param = None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        param = ".".join(loc) or None
        if first_param is None:
            first_param = param
        msg = err.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err.get("type") == "extra_forbidden":
            msg = "unrecognized request argument"
        parts.append(f"{param}: {msg}" if param else msg)
    return "; ".join(parts) or "invalid request", first_param


def find_lone_surrogate(value: Any, path: str = "") -> str | None:
    """The parameter path of the first string holding a lone UTF-16 surrogate (JSON's "\\ud800"), or None.

    Such a string is valid JSON but no Unicode text: it cannot be tokenized or encoded as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and find_lone_surrogate(key) is not None:
            return f"{path}.{key!r}".lstrip(".")
        found = find_lone_surrogate(item, f"{path}.{key}".lstrip("."))
        if found is not None:
            return found
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


_UNSUPPORTED = {"suffix": "suffix is"}


def _refuse_if_set(cls, v, info):
    """A field OpenAI defines but this server does not implement: any value but its empty default is a 400."""
    if v:
        raise ValueError(f"{_UNSUPPORTED[info.field_name]} not supported by this server")
    return v


class _SamplingFields(_Strict):
    """What both endpoints share: the model, the sampler, stopping, streaming."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # torch's seed range, n choices added
    stop: Union[str, list[str], None] = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted for compatibility, no effect here
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    logit_bias: dict[str, float] | None = None
    # structured output, vLLM's extension fields (server/structured.py turns them into a grammar)
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = None
    structured_outputs: dict[str, Any] | None = None
    # vLLM's extension fields for stopping: no stop token ends the answer; at least this many tokens
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return v

    @model_validator(mode="after")
    def _check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[Any] | None = None  # an assistant's earlier calls (server/tools.py reads them)
    tool_call_id: str | None = None  # a tool message's answer to that call

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, v):
        if v is not None and not 0 <= v <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {v}")
        return v

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: set logprobs to true to use top_logprobs")
        return self

    @property
    def logprobs_count(self) -> int | None:
        """How many alternatives per token to report: None when logprobs are off."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v):
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and isinstance(v[0], list) and any(len(p) == 0 for p in v):
            raise ValueError("token-id prompts must not be empty")
        return v

    _refuse_unsupported = field_validator("suffix")(_refuse_if_set)

    @field_validator("logprobs")
    @classmethod
    def _check_logprobs(cls, v):
        if v is not None and not 0 <= v <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {v}")
        return v

    @model_validator(mode="after")
    def _check_best_of(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported by this server")
        if self.echo and self.logprobs is not None:
            raise ValueError("logprobs: logprobs together with echo (the prompt's logprobs) are not supported; "
                             "drop echo or logprobs")
        return self

    @property
    def logprobs_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt as a list of prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


@dataclass(frozen=True)
class SamplingSpec:
    """What a request asks of the sampler and the stopping rules, free of HTTP."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    stop: tuple[str, ...]
    seed: int | None
    logprobs: int | None = None  # None: off; k: each token's logprob and its k most likely alternatives
    grammar: str | None = None  # structured output: an llguidance grammar (server/structured.py)
    decode_special_tokens: bool = False  # keep special tokens in the text (tool-call markers)
    ignore_eos: bool = False  # no stop token ends it (stop strings and max_tokens still do)
    min_tokens: int = 0  # stop tokens and strings are ignored before this many tokens


def sampling_spec(req: _SamplingFields, max_tokens: int) -> SamplingSpec:
    return SamplingSpec(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        stop=tuple(req.stop or ()),
        seed=req.seed,
        logprobs=req.logprobs_count,
        ignore_eos=req.ignore_eos,
        min_tokens=min(req.min_tokens, max_tokens),
    )
