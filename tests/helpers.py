"""Test helpers: load small models with lowgear and run whole prompts through them."""

from __future__ import annotations

import torch

import lowgear as lg
from lowgear.attention.metadata import build_metadata


def load(path, max_seq_len: int = 512, page_size: int = 16, **switches):
    config = lg.Config(str(path))
    for name, value in switches.items():
        setattr(config, name, value)
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=max_seq_len, page_size=page_size)
    model.load_autosplit(cache)
    return model, cache


def all_logits(model, cache, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] of one prompt run in one step through pages 0..n."""
    n = len(ids)
    pages = list(range(-(-n // cache.page_size)))
    meta = build_metadata([n], [n], [pages], cache.page_size, device=model.layer_devices[0], logits="all")
    return model.forward(torch.tensor(ids), meta, cache)


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()
