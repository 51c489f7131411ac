"""Test helper: copy a GGUF file with some metadata values or tensors changed (for bad-file tests)."""

from __future__ import annotations

import os

import gguf
import numpy as np
from gguf import GGUFValueType

_KEEP = object()


def _value(field):
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        return field.contents(), kind, field.types[-1]
    return field.contents(), kind, None


def find_string(path, text: str) -> int:
    """Byte offset of `text` (utf-8) in the file; the first occurrence."""
    with open(path, "rb") as f:
        data = f.read()
    at = data.find(text.encode())
    assert at >= 0, f"{text!r} not in {path}"
    return at


def patch_bytes(path, offset: int, new: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(new)


def rewrite_gguf(src, dst, meta: dict | None = None, drop: tuple = (), tensors: dict | None = None) -> str:
    """Copy GGUF `src` to `dst`.

    `meta`: key -> value (keeps the key's type) or (value, GGUFValueType[, sub_type]) for a new type.
    `drop`: metadata keys to leave out. `tensors`: GGUF tensor name -> a float32 numpy array in torch
    order ([rows, cols]) written as F32 in its place (any shape), (uint8 array, GGMLQuantizationType)
    for raw blocks, or None to leave the tensor out.
    """
    reader = gguf.GGUFReader(os.fspath(src))
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(os.fspath(dst), arch)
    meta = dict(meta or {})
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        value, kind, sub = _value(field)
        if key in meta:
            new = meta.pop(key)
            if isinstance(new, tuple):
                value, kind, sub = (*new, None)[:3]
            else:
                value = new
        w.add_key_value(key, value, kind, sub_type=sub)
    for key, new in meta.items():
        value, kind, sub = (*new, None)[:3] if isinstance(new, tuple) else (new, GGUFValueType.STRING, None)
        w.add_key_value(key, value, kind, sub_type=sub)
    tensors = dict(tensors or {})
    for t in reader.tensors:
        if t.name in tensors:
            new = tensors.pop(t.name)
            if isinstance(new, tuple):  # (uint8 bytes, GGMLQuantizationType): raw blocks
                w.add_tensor(t.name, np.ascontiguousarray(new[0], dtype=np.uint8), raw_dtype=new[1])
            elif new is not None:
                w.add_tensor(t.name, np.ascontiguousarray(new, dtype=np.float32))
            continue
        data = np.asarray(t.data)
        if t.tensor_type.name in ("F32", "F16"):
            w.add_tensor(t.name, data)
        else:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    for name, new in tensors.items():
        if new is not None:
            w.add_tensor(name, np.ascontiguousarray(new, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(dst)
