"""Corrupted model files, case by case: each either loads and generates a couple of tokens or ends in
one `LowgearError`; any other exception is a crash (issue 25).

Shared by tests/test_fuzz_files.py (a bounded run in the suite) and benchmarks/fuzz_files.py (a long
run that counts cases and crashes per target). A target is a hypothesis strategy for a mutation and
a function that writes the mutated file or folder from a tiny base model.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import gguf
import numpy as np
from hypothesis import strategies as st

import lowgear as lg
from lowgear.bench.synthetic import write_gguf, write_hf
from lowgear.errors import LowgearError

from gguf_edit import rewrite_gguf

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
MAX_SEQ_LEN = 32


# ------------------------------------------------------------------------------------------ base files

@dataclass
class Bases:
    root: str
    gguf_f32: str
    gguf_q8: str
    hf: str

    @classmethod
    def make(cls, root: str) -> "Bases":
        os.makedirs(root, exist_ok=True)
        return cls(
            root=root,
            gguf_f32=write_gguf(os.path.join(root, "f32.gguf"), seed=3, **TINY),
            gguf_q8=write_gguf(os.path.join(root, "q8.gguf"), qtype="Q8_0", seed=4, **TINY),
            hf=write_hf(os.path.join(root, "hf"), seed=5, **TINY),
        )


def gguf_layout(path: str) -> dict[str, Any]:
    """Byte offsets of a GGUF's parts: metadata region, each tensor info's fields, the data region."""
    r = gguf.GGUFReader(path)
    first_ti = min(t.field.offset for t in r.tensors)
    infos = []
    for t in r.tensors:
        off = t.field.offset
        name_len = int(t.field.parts[0][0])
        n_dims = int(t.field.parts[2][0])
        dims_at = off + 8 + name_len + 4
        type_at = dims_at + 8 * n_dims
        infos.append({"n_dims": off + 8 + name_len, "dims": dims_at, "n_dims_value": n_dims, "type": type_at,
                      "offset": type_at + 4, "name_len": off})
    return {"kv": (24, first_ti), "infos": infos, "data": (int(r.data_offset), os.path.getsize(path)),
            "keys": [k for k in r.fields if not k.startswith("GGUF.")]}


_LAYOUT_CACHE: dict[str, dict] = {}


def layout(path: str) -> dict:
    if path not in _LAYOUT_CACHE:
        _LAYOUT_CACHE[path] = gguf_layout(path)
    return _LAYOUT_CACHE[path]


def _write_at(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# ------------------------------------------------------------------------------------------ strategies

# values a field might hold after corruption: edge integers, floats, strings, arrays, booleans
INTS = st.one_of(st.sampled_from([0, 1, -1, 2, 3, 7, 31, 33, 255, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1]),
                 st.integers(min_value=0, max_value=2**64 - 1))
SIGNED = st.integers(min_value=-2**63, max_value=2**63 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
TEXT = st.text(max_size=12)
GGUF_VALUES = st.one_of(
    st.tuples(st.integers(0, 2**32 - 1), st.just(gguf.GGUFValueType.UINT32)),
    st.tuples(st.integers(-2**31, 2**31 - 1), st.just(gguf.GGUFValueType.INT32)),
    st.tuples(st.integers(0, 2**64 - 1), st.just(gguf.GGUFValueType.UINT64)),
    st.tuples(FLOATS, st.just(gguf.GGUFValueType.FLOAT32)),
    st.tuples(st.booleans(), st.just(gguf.GGUFValueType.BOOL)),
    st.tuples(TEXT.filter(bool), st.just(gguf.GGUFValueType.STRING)),
    st.tuples(st.lists(TEXT, min_size=1, max_size=4), st.just(gguf.GGUFValueType.ARRAY), st.just(gguf.GGUFValueType.STRING)),
    st.tuples(st.lists(st.integers(-5, 300), min_size=1, max_size=4), st.just(gguf.GGUFValueType.ARRAY),
              st.just(gguf.GGUFValueType.INT32)),
)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), TEXT,
              st.sampled_from([0, -1, 1, 2, 3, 16, 31, 32, 48, 64, 10**12])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=6,
)


def _pick(draw_index: int, seq):
    return seq[draw_index % len(seq)]


# ------------------------------------------------------------------------------------------ GGUF targets

def gguf_header(bases: Bases, out: str, m) -> str:
    """Bytes 4..24: version, tensor count, kv count."""
    field, value = m
    path = shutil.copy(bases.gguf_f32, out)
    offset, fmt = {"version": (4, "<I"), "tensor_count": (8, "<Q"), "kv_count": (16, "<Q")}[field]
    _write_at(path, offset, struct.pack(fmt, value % (2 ** (8 * struct.calcsize(fmt)))))
    return path


GGUF_HEADER = st.tuples(st.sampled_from(["version", "tensor_count", "kv_count"]), INTS)


def gguf_metadata_value(bases: Bases, out: str, m) -> str:
    """One metadata key set to a value of any type, or dropped."""
    index, value, drop = m
    keys = [k for k in layout(bases.gguf_f32)["keys"] if k != "general.architecture"]
    key = _pick(index, keys)
    if drop:
        return rewrite_gguf(bases.gguf_f32, out, drop=(key,))
    return rewrite_gguf(bases.gguf_f32, out, meta={key: value})


GGUF_METADATA_VALUE = st.tuples(st.integers(0, 10**6), GGUF_VALUES, st.booleans())


def gguf_metadata_bytes(bases: Bases, out: str, m) -> str:
    """Bytes inside the metadata region overwritten (lengths, type ids, string bytes)."""
    pos, data = m
    path = shutil.copy(bases.gguf_f32, out)
    lo, hi = layout(bases.gguf_f32)["kv"]
    _write_at(path, lo + pos % (hi - lo), data)
    return path


GGUF_METADATA_BYTES = st.tuples(st.integers(0, 10**9), st.binary(min_size=1, max_size=8))


def gguf_tensor_info(bases: Bases, out: str, m) -> str:
    """A tensor info's name length, dims count, a dim, type id or data offset set to another value."""
    which, part, value, base = m
    src = bases.gguf_q8 if base else bases.gguf_f32
    path = shutil.copy(src, out)
    info = _pick(which, layout(src)["infos"])
    if part == "dims":
        _write_at(path, info["dims"] + 8 * (value % info["n_dims_value"]), struct.pack("<Q", value % 2**64))
    else:
        fmt = {"n_dims": "<I", "type": "<I", "offset": "<Q", "name_len": "<Q"}[part]
        small = value % 2 ** (8 * struct.calcsize(fmt))
        _write_at(path, info[part], struct.pack(fmt, small))
    return path


GGUF_TENSOR_INFO = st.tuples(st.integers(0, 10**6), st.sampled_from(["n_dims", "dims", "type", "offset", "name_len"]),
                             st.one_of(st.integers(0, 64), INTS), st.booleans())


def gguf_data(bases: Bases, out: str, m) -> str:
    """Tensor data overwritten: random bytes, or float specials (NaN, inf, huge) in F32 data."""
    pos, data, base = m
    src = bases.gguf_q8 if base else bases.gguf_f32
    path = shutil.copy(src, out)
    lo, hi = layout(src)["data"]
    _write_at(path, lo + (pos % (hi - lo - len(data))), data)
    return path


SPECIALS = st.sampled_from([np.float32(x).tobytes() for x in (np.nan, np.inf, -np.inf, 3e38, -3e38)] + [b"\xff" * 8, b"\x7c\x00" * 4])
GGUF_DATA = st.tuples(st.integers(0, 10**9), st.one_of(st.binary(min_size=1, max_size=64), SPECIALS.map(lambda b: b * 4)),
                      st.booleans())


def gguf_truncated(bases: Bases, out: str, m) -> str:
    """The file cut short anywhere."""
    keep = m
    with open(bases.gguf_f32, "rb") as f:
        data = f.read()
    with open(out, "wb") as f:
        f.write(data[: keep % len(data)])
    return out


GGUF_TRUNCATED = st.integers(0, 10**9)


# ------------------------------------------------------------------------------------------ HF targets

HF_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
             "tie_word_embeddings", "sliding_window", "bos_token_id", "eos_token_id", "model_type", "architectures",
             "torch_dtype", "quantization_config", "rope_parameters", "attention_bias"]


def hf_config(bases: Bases, out: str, m) -> str:
    """config.json with one field set to any JSON value (or removed), or the whole file replaced."""
    index, value, mode = m
    folder = shutil.copytree(bases.hf, out)
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    field = _pick(index, HF_FIELDS)
    if mode == "remove":
        cfg.pop(field, None)
    elif mode == "whole":
        cfg = value
    else:
        cfg[field] = value
    with open(path, "w") as f:
        json.dump(cfg, f)
    return folder


HF_CONFIG = st.tuples(st.integers(0, 10**6), JSON_VALUES, st.sampled_from(["set", "set", "set", "remove", "whole"]))


def _safetensors(folder: str) -> str:
    return os.path.join(folder, "model.safetensors")


def hf_safetensors_header(bases: Bases, out: str, m) -> str:
    """The safetensors header: a tensor entry's dtype, shape or data_offsets changed, the header
    length changed, or header bytes overwritten."""
    mode, index, value, raw = m
    folder = shutil.copytree(bases.hf, out)
    path = _safetensors(folder)
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header, body = json.loads(blob[8 : 8 + n]), blob[8 + n :]
    names = sorted(k for k in header if k != "__metadata__")
    name = _pick(index, names)
    if mode == "length":
        blob = struct.pack("<Q", value % 2**64) + blob[8:]
    elif mode == "bytes":
        at = 8 + index % n
        blob = blob[:at] + raw + blob[at + len(raw):]
    else:
        entry = header[name]
        if mode == "dtype":
            entry["dtype"] = _pick(value, ["F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "BF16", "F16", "F32", "XX"])
        elif mode == "shape":
            shape = list(entry["shape"])
            if shape and value % 3:
                shape[value % len(shape)] = value % 100
            else:
                shape = shape + [1] if value % 2 else shape[:-1]
            entry["shape"] = shape
        elif mode == "offsets":
            lo, hi = entry["data_offsets"]
            entry["data_offsets"] = [lo, hi + (value % 64) - 32] if value % 2 else [value % (len(body) + 64), hi]
        elif mode == "drop":
            del header[name]
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        blob = struct.pack("<Q", len(text)) + text + body
    with open(path, "wb") as f:
        f.write(blob)
    return folder


HF_SAFETENSORS = st.tuples(st.sampled_from(["dtype", "shape", "offsets", "drop", "length", "bytes"]), st.integers(0, 10**6),
                           st.one_of(st.integers(0, 200), INTS), st.binary(min_size=1, max_size=8))


@dataclass(frozen=True)
class Target:
    name: str
    strategy: Any
    write: Callable[[Bases, str, Any], str]


TARGETS = {t.name: t for t in [
    Target("gguf_header", GGUF_HEADER, gguf_header),
    Target("gguf_metadata_value", GGUF_METADATA_VALUE, gguf_metadata_value),
    Target("gguf_metadata_bytes", GGUF_METADATA_BYTES, gguf_metadata_bytes),
    Target("gguf_tensor_info", GGUF_TENSOR_INFO, gguf_tensor_info),
    Target("gguf_data", GGUF_DATA, gguf_data),
    Target("gguf_truncated", GGUF_TRUNCATED, gguf_truncated),
    Target("hf_config", HF_CONFIG, hf_config),
    Target("hf_safetensors_header", HF_SAFETENSORS, hf_safetensors_header),
]}


# ------------------------------------------------------------------------------------------ one case

def load_and_generate(path: str) -> str:
    """What `lowgear generate` does: open, tokenizer, load, two greedy tokens."""
    config = lg.Config(path)
    config.max_seq_len = MAX_SEQ_LEN
    tokenizer = lg.Tokenizer(config)
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=MAX_SEQ_LEN)
    model.load_autosplit(cache)
    gen = lg.Generator(model=model, cache=cache, tokenizer=tokenizer)
    return gen.generate("hi", max_new_tokens=2, gen_settings=lg.SamplerSettings.greedy(), completion_only=True)


def run_case(target: Target, bases: Bases, mutation, workdir: str) -> tuple[str, str]:
    """("ok" | "error" | "crash", detail). A crash's detail is the traceback's last lines."""
    out = os.path.join(workdir, "case" + (".gguf" if target.name.startswith("gguf") else ""))
    if os.path.isdir(out):
        shutil.rmtree(out)
    elif os.path.exists(out):
        os.remove(out)
    path = target.write(bases, out, mutation)
    try:
        load_and_generate(path)
        return "ok", ""
    except LowgearError as e:
        message = str(e)
        if "\n" in message.strip():
            return "crash", f"multi-line LowgearError: {message!r}"
        return "error", message
    except Exception as e:  # noqa: BLE001 - the point: anything else is a crash
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-4:])
        return "crash", f"{type(e).__name__}: {e}\n{tb}"
