"""Log-probabilities in OpenAI's response shapes.

The generator reports, per token of a job that asked, (token id, logprob, [(id, logprob)] best
first) — computed from the model's raw logits (engine/runner.py `token_logprobs`). Chat answers list
them as `logprobs.content[]` ({token, logprob, bytes, top_logprobs}); completions as four parallel
lists (tokens, token_logprobs, top_logprobs as {token: logprob}, text_offset).
"""

from __future__ import annotations


def _token_text(table: list[bytes], token: int) -> tuple[str, list[int]]:
    raw = table[token] if 0 <= token < len(table) else b""
    # a token may hold part of a UTF-8 character: its text shows the bytes it cannot spell
    return raw.decode("utf-8", errors="replace"), list(raw)


def _table(tokenizer) -> list[bytes]:
    return tokenizer.token_bytes_table(decode_special_tokens=True)


def chat_content(tokenizer, entries: list) -> list[dict]:
    """`choices[].logprobs.content` for some tokens."""
    table = _table(tokenizer)
    out = []
    for token, logprob, top in entries:
        text, raw = _token_text(table, token)
        alternatives = []
        for alt, alt_logprob in top:
            alt_text, alt_raw = _token_text(table, alt)
            alternatives.append({"token": alt_text, "logprob": alt_logprob, "bytes": alt_raw})
        out.append({"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": alternatives})
    return out


def completion_lists(tokenizer, entries: list, offset: int = 0) -> tuple[dict, int]:
    """`choices[].logprobs` of /v1/completions for some tokens, their text starting at character
    `offset` of the choice's text; returns it and the offset after them."""
    table = _table(tokenizer)
    body = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, logprob, top in entries:
        text, _ = _token_text(table, token)
        body["tokens"].append(text)
        body["token_logprobs"].append(logprob)
        body["top_logprobs"].append({_token_text(table, alt)[0]: alt_lp for alt, alt_lp in top})
        body["text_offset"].append(offset)
        offset += len(text)
    return body, offset
