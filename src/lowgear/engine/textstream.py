"""Turning a stream of token ids into a stream of text.

A token is a sequence of bytes, not of characters: byte-level BPE splits a multi-byte UTF-8
character (an emoji, a CJK ideograph) over two or more tokens. `TextStream` feeds each token's
bytes to an incremental UTF-8 decoder, so `push()` returns only characters that are complete and a
character split over tokens is never emitted in halves. Bytes that can no longer start or continue
a valid character become U+FFFD at once; an incomplete tail waits for the next token, and `flush()`
turns whatever is still incomplete at the end into U+FFFD.
"""

from __future__ import annotations

import codecs
from typing import Sequence


class TextStream:
    def __init__(self, token_bytes_table: Sequence[bytes]):
        """`token_bytes_table[i]` is the bytes token i stands for (b"" for tokens that print nothing)."""
        self.table = token_bytes_table
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        if not 0 <= token_id < len(self.table):
            raise ValueError(f"token id {token_id} is outside the tokenizer's vocabulary of {len(self.table)}")
        return self._decoder.decode(self.table[token_id])

    def push_bytes(self, data: bytes) -> str:
        """Add raw bytes; return the text they complete."""
        return self._decoder.decode(data)

    def flush(self) -> str:
        """End of the stream: return the held tail (an incomplete character becomes U+FFFD) and reset."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
