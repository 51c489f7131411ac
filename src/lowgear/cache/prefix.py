"""Content keys for full pages of tokens, chained so that a key names a whole prefix.

A page's KV content depends on its own tokens and on every token before it, so the key of page i
hashes page i's tokens together with the key of page i-1: equal keys mean equal prefixes up to
and including that page. Two prompts that start alike then find the same keys for their common
full pages, and the page pool (cache.pages) hands out the pages already computed for them.

The digest is a 64-bit BLAKE2b over a fixed little-endian encoding: stable across processes and
machines (Python's `hash()` is salted per process), with collisions negligible at cache sizes.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence

_ROOT = b"\x00"
_CHAINED = b"\x01"


def page_key(prev_key: int | None, tokens: Sequence[int]) -> int:
    """Key of a full page holding `tokens`, following the page whose key is `prev_key` (None: first page)."""
    h = hashlib.blake2b(digest_size=8, person=b"lowgear-page")
    if prev_key is None:
        h.update(_ROOT)
    else:
        h.update(_CHAINED + prev_key.to_bytes(8, "little"))
    h.update(struct.pack(f"<I{len(tokens)}q", len(tokens), *tokens))
    return int.from_bytes(h.digest(), "little")


def prefix_keys(tokens: Sequence[int], page_size: int) -> list[int]:
    """Keys of every full page of `tokens` (a trailing partial page has none)."""
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    keys: list[int] = []
    prev = None
    for start in range(0, len(tokens) - page_size + 1, page_size):
        prev = page_key(prev, tokens[start : start + page_size])
        keys.append(prev)
    return keys
