"""Structured output: a request's format constraint as an llguidance grammar, and the per-job mask.

Sources, one per request: OpenAI's `response_format` ({"type": "json_object"} or {"type":
"json_schema", "json_schema": {"name", "schema", "strict"}}) and vLLM's extensions (`guided_json`,
`guided_regex`, `guided_grammar` (Lark or GBNF), `guided_choice`, and the `structured_outputs`
object with keys json / regex / grammar / choice / json_object). `request_grammar` compiles the one
given into an llguidance grammar and checks it against the model's vocabulary, so a schema the
library cannot handle is a 400 naming the field before any job starts.
why llguidance: docs/decisions/017-structured-grammar-library.md

`GrammarConstraint` is what the engine sees (engine/job.py `constraint`): `allowed(width)` gives the
tokens the grammar allows next as a bool tensor, `accept(token)` advances it, `error()` says why it
allows nothing. The engine asks only the rows that have one, so unconstrained requests in the same
batch pay nothing. The stop tokens (end of turn, end of text) are the grammar's end: once the
document is complete only they are allowed, and the job ends the usual way.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import torch

from .openai_types import APIError

EXTRA_HINT = "structured output needs the llguidance library: pip install 'lowgear[structured]'"
# JSON without free whitespace: a small model greedy-decoding a schema cannot wander into endless
# newlines, and the shortest valid document is also the cheapest in tokens.
JSON_OPTIONS = {"whitespace_flexible": False}

_tokenizers: dict[int, tuple[Any, Any]] = {}
_lock = threading.Lock()


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise APIError(400, EXTRA_HINT, code="structured_output_unavailable") from None
    return llguidance


def ll_tokenizer(tokenizer):
    """The llguidance view of a lowgear Tokenizer (built once per tokenizer: ~0.2 s)."""
    llg = _llguidance()
    with _lock:
        hit = _tokenizers.get(id(tokenizer))
        if hit is None or hit[0] is not tokenizer:
            if not hasattr(tokenizer, "to_json"):
                raise APIError(400, "structured output needs a Hugging Face tokenizers vocabulary, which this "
                                    "model's tokenizer does not give", code="structured_output_unavailable")
            stops = sorted(tokenizer.stop_token_ids)
            hit = (tokenizer, llg.LLTokenizer(tokenizer.to_json(), n_vocab=tokenizer.vocab_size, eos_token=stops))
            _tokenizers[id(tokenizer)] = hit
    return hit[1]


def _schema_grammar(llg, schema: Any, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise APIError(400, f"{param} is not valid JSON ({exc})", param=param, code="invalid_value") from None
    if not isinstance(schema, dict):
        raise APIError(400, f"{param} must be a JSON schema object", param=param, code="invalid_value")
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except Exception as exc:  # the library's report on a schema it cannot read
        raise APIError(400, f"{param}: {exc}", param=param, code="invalid_value") from None


def _grammar(llg, kind: str, value: Any, param: str) -> str:
    """One source's grammar; kind: json | regex | grammar | choice | json_object."""
    if kind == "json":
        return _schema_grammar(llg, value, param)
    if kind == "json_object":
        return _schema_grammar(llg, {"type": "object"}, param)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise APIError(400, f"{param} must be a non-empty list of strings", param=param, code="invalid_value")
        return llg.grammar_from("choice", json.dumps(value))  # never raises for a list of strings
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{param} must be a non-empty string", param=param, code="invalid_value")
    try:
        return llg.grammar_from("regex" if kind == "regex" else "grammar", value)
    except Exception as exc:  # the library's report on a grammar it cannot read
        raise APIError(400, f"{param}: {exc}", param=param, code="invalid_value") from None


def _sources(req) -> list[tuple[str, Any, str]]:
    """(kind, value, parameter name) for every format constraint the request gives."""
    found = []
    fmt = getattr(req, "response_format", None)
    if fmt:
        kind = fmt.get("type", "text")
        if kind == "json_object":
            found.append(("json_object", True, "response_format"))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise APIError(400, "response_format.json_schema must be an object with a 'schema' (and a 'name')",
                               param="response_format.json_schema", code="invalid_value")
            found.append(("json", spec["schema"], "response_format.json_schema.schema"))
        elif kind != "text":
            raise APIError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           param="response_format.type", code="invalid_value")
    for kind in ("json", "regex", "grammar", "choice"):
        value = getattr(req, f"guided_{kind}", None)
        if value is not None:
            found.append((kind, value, f"guided_{kind}"))
    for key, value in (req.structured_outputs or {}).items():
        if key not in ("json", "regex", "grammar", "choice", "json_object"):
            raise APIError(400, f"structured_outputs.{key} is not supported; use json, regex, grammar, choice or "
                                "json_object", param=f"structured_outputs.{key}", code="invalid_value")
        if value is not None and value is not False:
            found.append((key, value, f"structured_outputs.{key}"))
    return found


def request_grammar(tokenizer, req) -> str | None:
    """The checked llguidance grammar for a request's format constraint, or None when it has none."""
    sources = _sources(req)
    if not sources:
        return None
    if len(sources) > 1:
        names = ", ".join(p for _, _, p in sources)
        raise APIError(400, f"give one format constraint, not several ({names})", param=sources[1][2],
                       code="invalid_value")
    kind, value, param = sources[0]
    return checked(tokenizer, _grammar(_llguidance(), kind, value, param), param)


def lark_grammar(lark: str) -> str:
    """An llguidance grammar from Lark text (checked later, by `checked`)."""
    return _llguidance().LLMatcher.grammar_from_lark(lark)


def checked(tokenizer, grammar: str, param: str) -> str:
    """`grammar` once llguidance has compiled it for this vocabulary; else a 400 naming `param`."""
    llg = _llguidance()
    error = llg.LLMatcher.validate_grammar(grammar, ll_tokenizer(tokenizer))
    if error:
        raise APIError(400, f"{param} cannot be compiled into a grammar: {error}", param=param, code="invalid_value")
    return grammar


class GrammarConstraint:
    """One job's grammar state (engine/job.py `constraint`)."""

    def __init__(self, tokenizer, grammar: str):
        llg = _llguidance()
        self.vocab = tokenizer.vocab_size
        self.matcher = llg.LLMatcher(ll_tokenizer(tokenizer), grammar)
        self._error: str | None = None

    def allowed(self, width: int) -> torch.Tensor:
        """The tokens allowed next, as a bool tensor [width] (ids past the vocabulary: never)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.zeros(width, dtype=bool)
        n = min(width, self.vocab)
        mask[:n] = np.unpackbits(bits, bitorder="little")[:n].astype(bool)
        if not mask.any():
            self._error = self.matcher.get_error() or "the output grammar allows no next token"
        return torch.from_numpy(mask)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token) and self._error is None:
            self._error = self.matcher.get_error() or f"token {token} is not allowed by the output grammar"

    def error(self) -> str | None:
        return self._error
