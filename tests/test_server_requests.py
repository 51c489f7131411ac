"""OpenAI request fields the server does not implement, or values past its limits, are refused with a
clear message (a 400 upstream)."""

import pytest
from pydantic import ValidationError

from lowgear.server.openai_types import ChatCompletionRequest, CompletionRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}


@pytest.mark.parametrize(
    "cls, base, field, value, message",
    [
        (ChatCompletionRequest, CHAT, "top_logprobs", 21, "top_logprobs must be between 0 and 20"),
        (CompletionRequest, COMPLETION, "logprobs", 21, "logprobs must be between 0 and 20"),
        (CompletionRequest, COMPLETION, "suffix", "x", "suffix is not supported by this server"),
    ],
)
def test_unsupported_fields_are_refused(cls, base, field, value, message):
    cls(**base)  # the default is accepted
    with pytest.raises(ValidationError, match=message):
        cls(**base, **{field: value})
