"""Test helpers: load small models with lowgear and run whole prompts through them."""

from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def interpreter_index_shim():
    """Triton 3.6's interpreter turns a 1-element array into an int with int(arr), which numpy >= 2.3
    refuses for arrays with ndim > 0, so a `range(runtime_int)` loop in a kernel raises TypeError
    under TRITON_INTERPRET=1. This gives its tensors an __index__ for the duration (the compiled path
    is unaffected; without triton it does nothing)."""
    try:
        import triton.runtime.interpreter as interp
    except ImportError:
        yield
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    try:
        yield
    finally:
        interp._patch_lang_tensor = original
