"""KV cache: tensors (kv.py), page bookkeeping (pages.py) and prefix keys (prefix.py)."""

from .kv import DEFAULT_PAGE_SIZE, Cache

__all__ = ["Cache", "DEFAULT_PAGE_SIZE"]
