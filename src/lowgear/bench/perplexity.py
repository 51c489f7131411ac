"""Perplexity of a loaded model on a token stream, fed through its paged KV cache.

The stream is cut into windows of `window` tokens, each one sequence from position 0; a window goes
in chunks of `chunk` tokens, so every chunk after the first attends to K/V that the cache stored
(and, for an 8-bit cache, quantized) for the earlier ones. The text used by the KV-cache tests and
benchmarks/kv_cache_perplexity.py is the standard library's pydoc topics (`pydoc_text`).
"""

from __future__ import annotations

import math

import torch

from ..attention.metadata import build_metadata
from ..cache.pages import pages_needed


def pydoc_text() -> str:
    """The pydoc help topics of this Python (pydoc_data/topics.py), in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def window_nll(model, cache, ids: list[int], chunk: int) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of ids[1:] given what precedes each, and how many tokens it covers."""
    if len(ids) > cache.capacity_tokens:
        raise ValueError(f"a window of {len(ids)} tokens does not fit the cache ({cache.capacity_tokens} tokens)")
    pages = list(range(pages_needed(len(ids), cache.page_size)))
    device = model.layer_devices[0]
    total = 0.0
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start : start + chunk]
        meta = build_metadata([len(piece)], [start + len(piece)], [pages], cache.page_size, device=device, logits="all")
        logits = model.forward(torch.tensor(piece, dtype=torch.long), meta, cache)
        targets = torch.tensor(ids[start + 1 : start + len(piece) + 1], device=logits.device)
        logp = torch.log_softmax(logits[: len(targets)].double(), dim=-1)
        total -= float(logp.gather(1, targets[:, None]).sum())
    return total, len(ids) - 1


def perplexity(model, cache, ids: list[int], window: int = 2048, chunk: int = 512) -> float:
    """exp(mean NLL) over every window of the stream (a last window shorter than 2 tokens is left out)."""
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        part = ids[start : start + window]
        if len(part) < 2:
            break
        n, c = window_nll(model, cache, part, chunk)
        nll, count = nll + n, count + c
    return math.exp(nll / count)
