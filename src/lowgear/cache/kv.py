"""`Cache`: the KV memory of a loaded model: per layer, a key and a value page pool on that layer's device.

Layout per layer: [num_pages, page_size, kv_heads, head_dim]. A contiguous cache is the same thing
with one page of max_seq_len tokens, so every attention rung reads one layout through block tables.
`max_seq_len` is the cache's total token capacity (shared by all running jobs), as in ExLlamaV2.
Page bookkeeping (which page belongs to whom) lives in cache.pages; this file owns only tensors.

A quantized cache (kv_dtype int8, fp8_e4m3, int4) stores head vectors in the frame its scheme names
(defaults.KV_SCHEMES, ops/kv_write.py): a Hadamard rotation and/or keys and values less a per-layer,
per-kv-head, per-channel mean. The means are calibrated when the pages are allocated, from one forward
of KV_CALIBRATION_TOKENS fixed pseudo-random token ids over float pages, so they are the same for
every sequence the cache holds and for every run of the same model on the same device. Keys are
never shifted for a model that soft-caps attention scores (cap * tanh(q.k / cap) is not shift-invariant).
"""

from __future__ import annotations

import torch

from .. import defaults
from ..platform.dtypes import dtype_bytes
from ..errors import ConfigError
from ..platform.placement import kv_bytes_per_token_per_layer
from ..attention.metadata import build_metadata
from ..ops.kv_write import KV_DTYPES, QuantizedKV
from .pages import PagePool

DEFAULT_PAGE_SIZE = defaults.PAGE_SIZE


class Cache:
    def __init__(
        self,
        model,
        max_seq_len: int | str | None = None,
        page_size: int | None = None,
        lazy: bool = True,
        contiguous: bool = False,
        dtype: torch.dtype | None = None,
        kv_dtype: str | None = None,  # "auto" (the model dtype), "int8", "fp8_e4m3" or "int4": a scale per token and head
        kv_scheme: str | None = None,  # a quantized cache's frame: "rot", "k", "v" joined by "+", or "none"
    ):
        self.model = model
        requested = model.config.max_seq_len if max_seq_len is None else max_seq_len
        if requested != "auto" and (not isinstance(requested, int) or requested <= 0):
            raise ConfigError(f"max_seq_len must be a positive number of tokens or 'auto', got {requested!r}")
        self.requested_seq_len = requested
        self.contiguous = contiguous
        self.page_size = page_size or model.config.effective_page_size()
        self.dtype = dtype
        kv_dtype = kv_dtype or model.config.kv_cache_dtype
        if kv_dtype != "auto" and kv_dtype not in KV_DTYPES:
            raise ConfigError(f"kv_dtype {kv_dtype!r} is not a KV cache storage: use auto, {', '.join(KV_DTYPES)}")
        self.kv_dtype = kv_dtype
        self.kv_scheme = parse_scheme(kv_scheme or defaults.KV_SCHEMES.get(kv_dtype, "none"))
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.num_pages = 0
        self.max_seq_len = 0 if requested == "auto" else requested
        if not lazy:
            if not model.loaded:
                model.load_autosplit(self)
            elif not self.allocated:
                self.allocate()

    @property
    def allocated(self) -> bool:
        return bool(self.k)

    def bytes_per_token_per_layer(self, dtype: torch.dtype) -> int:
        return kv_bytes_per_token_per_layer(self.model.spec, dtype_bytes(dtype), self.kv_dtype)

    def allocate(self, max_seq_len: int | None = None) -> None:
        """Allocate the pages on each layer's device, sized for `max_seq_len` tokens in all."""
        model = self.model
        if max_seq_len is not None:
            self.max_seq_len = max_seq_len
        if self.max_seq_len <= 0:
            raise ConfigError("the cache has no size: give max_seq_len (tokens) or 'auto' before loading")
        dtype = self.dtype or model.dtype
        spec = model.spec
        if self.contiguous:
            self.page_size = self.max_seq_len
        self.num_pages = -(-self.max_seq_len // self.page_size)
        shape = (self.num_pages, self.page_size, spec.num_kv_heads, spec.head_dim)
        if self.kv_dtype == "auto":
            self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in model.layer_devices]
            self.v = [torch.zeros(shape, dtype=dtype, device=d) for d in model.layer_devices]
        else:
            rotate = "rot" in self.kv_scheme
            self.k = [QuantizedKV.zeros(shape, self.kv_dtype, dtype, d, rotate) for d in model.layer_devices]
            self.v = [QuantizedKV.zeros(shape, self.kv_dtype, dtype, d, rotate) for d in model.layer_devices]
        self.dtype = dtype
        self.pool = PagePool(self.num_pages, self.page_size)
        shift_k = "k" in self.kv_scheme and not model.spec.attn_softcap
        if shift_k or "v" in self.kv_scheme:
            for i, (mk, mv) in enumerate(channel_means(model, self.capacity_tokens, self.page_size)):
                self.k[i].shift = mk if shift_k else None
                self.v[i].shift = mv if "v" in self.kv_scheme else None

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def nbytes(self) -> int:
        return sum(t.nbytes if isinstance(t, QuantizedKV) else t.numel() * t.element_size() for t in self.k + self.v)


SCHEME_PARTS = ("rot", "k", "v")


def parse_scheme(scheme: str) -> frozenset:
    """"rot+k" -> {"rot", "k"}; "none" -> {} (see defaults.KV_SCHEMES)."""
    parts = frozenset() if scheme == "none" else frozenset(scheme.split("+"))
    if not parts <= set(SCHEME_PARTS):
        raise ConfigError(f"kv_scheme {scheme!r} is not a KV frame: join {', '.join(SCHEME_PARTS)} with '+', or give 'none'")
    return parts


def calibration_ids(vocab_size: int, n: int) -> torch.Tensor:
    """n fixed pseudo-random token ids (torch's CPU generator, seed 0: the same ids on every device)."""
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(0))


class _FloatPages:
    """Float K/V pages for one sequence of n tokens, in the model's dtype and the real cache's page size (the
    layout every attention rung already runs): what calibration runs over. `capacity_tokens` is the real
    cache's, so the model keeps the RoPE table that cache reads."""

    def __init__(self, model, n: int, page_size: int, capacity_tokens: int):
        spec = model.spec
        self.page_size = page_size
        self.num_pages = -(-n // page_size)
        shape = (self.num_pages, page_size, spec.num_kv_heads, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=model.dtype, device=d) for d in model.layer_devices]
        self.v = [torch.zeros(shape, dtype=model.dtype, device=d) for d in model.layer_devices]
        self.capacity_tokens = capacity_tokens

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]


def channel_means(model, capacity_tokens: int, page_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the mean key and value [kv_heads, head_dim] (float32, on the layer's device) over one forward
    of defaults.KV_CALIBRATION_TOKENS fixed token ids (calibration_ids) through float pages."""
    n = min(defaults.KV_CALIBRATION_TOKENS, capacity_tokens)
    pages = _FloatPages(model, n, page_size, capacity_tokens)
    meta = build_metadata([n], [n], [list(range(pages.num_pages))], page_size, device=model.layer_devices[0])
    model.forward(calibration_ids(model.spec.vocab_size, n), meta, pages)
    return [(k.flatten(0, 1)[:n].float().mean(0), v.flatten(0, 1)[:n].float().mean(0)) for k, v in zip(pages.k, pages.v)]
