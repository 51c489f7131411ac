"""`write_gguf`: a random Llama-family model as a complete GGUF file (metadata, tokenizer, weights)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ...errors import ConfigError
from .common import (CHATML_TEMPLATE, QUANT_FORMATS, WEIGHT_STD, TensorPlan, _check_type, _float_values,
                     _packed_values, _plan, _progress, _random_bytes, _shapes, _stored_type, _to_bf16_bytes,
                     synthetic_vocab)

_GGUF_NAMES = {
    "embed": "token_embd.weight",
    "attn_norm": "blk.{i}.attn_norm.weight",
    "q": "blk.{i}.attn_q.weight",
    "k": "blk.{i}.attn_k.weight",
    "v": "blk.{i}.attn_v.weight",
    "q_bias": "blk.{i}.attn_q.bias",
    "k_bias": "blk.{i}.attn_k.bias",
    "v_bias": "blk.{i}.attn_v.bias",
    "q_norm": "blk.{i}.attn_q_norm.weight",
    "k_norm": "blk.{i}.attn_k_norm.weight",
    "o": "blk.{i}.attn_output.weight",
    "ffn_norm": "blk.{i}.ffn_norm.weight",
    "gate": "blk.{i}.ffn_gate.weight",
    "up": "blk.{i}.ffn_up.weight",
    "down": "blk.{i}.ffn_down.weight",
    "norm": "output_norm.weight",
    "lm_head": "output.weight",
}


def write_gguf(
    path: str | os.PathLike,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    head_dim: int | None = None,
    qtype: str = "F32",
    seed: int = 0,
    tokenizer: str | None = "gpt2-bytes",
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-5,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    attention_bias: bool | None = None,
    sliding_window: int | None = None,
    rope_scaling: dict | None = None,
    rope_freqs: Sequence[float] | None = None,
    tensor_types: dict[str, str] | None = None,
    std: float = WEIGHT_STD,
    progress: bool | None = None,
) -> str:
    """Write a random model as GGUF and return its path.

    `qtype` is the type of every linear and embedding tensor (norms and biases are F32);
    `tensor_types` overrides it per GGUF tensor name (e.g. {"token_embd.weight": "Q8_0"}).
    With tokenizer="gpt2-bytes" the vocabulary is `byte_vocab(vocab_size)` and vocab_size
    becomes its length; with tokenizer=None no tokenizer metadata is written. `arch` is written
    as given (an unsupported one is how tests make an unsupported file).
    """
    import gguf

    num_kv_heads, head_dim, intermediate_size = _shapes(arch, hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size)
    _check_type(qtype)
    for t in (tensor_types or {}).values():
        if t not in gguf.GGMLQuantizationType.__members__:
            raise ConfigError(f"unknown GGUF tensor type {t!r}")
    vocab, vocab_size = synthetic_vocab(tokenizer, vocab_size)
    bias = arch == "qwen2" if attention_bias is None else attention_bias

    w = gguf.GGUFWriter(os.fspath(path), arch)
    _write_metadata(w, arch, dict(context_length=max_position_embeddings, embedding_length=hidden_size,
                                  block_count=num_layers, feed_forward_length=intermediate_size,
                                  head_count=num_heads, head_count_kv=num_kv_heads, head_dim=head_dim,
                                  rope_theta=rope_theta, rms_norm_eps=rms_norm_eps, vocab_size=vocab_size,
                                  sliding_window=sliding_window, rope_scaling=rope_scaling), vocab)

    plan = _plan(arch, hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size, vocab_size,
                 tie_word_embeddings, bias, _GGUF_NAMES)
    if rope_freqs is not None:
        plan.append(TensorPlan("rope_freqs.weight", (len(rope_freqs),), "rope_freqs"))
    types = {t.name: (tensor_types or {}).get(t.name, _stored_type(t, qtype)) for t in plan}

    _write_tensors(w, plan, types, seed, std, rope_freqs, _progress_for(plan, types, progress, path))
    w.close()
    return os.fspath(path)


def _write_metadata(w, arch: str, m: dict, vocab) -> None:
    """The architecture's hyperparameters and (with a vocabulary) the gpt2-style tokenizer, as llama.cpp names them."""
    w.add_name(f"lowgear synthetic {arch}")
    w.add_uint32(f"{arch}.context_length", m["context_length"])
    w.add_uint32(f"{arch}.embedding_length", m["embedding_length"])
    w.add_uint32(f"{arch}.block_count", m["block_count"])
    w.add_uint32(f"{arch}.feed_forward_length", m["feed_forward_length"])
    w.add_uint32(f"{arch}.attention.head_count", m["head_count"])
    w.add_uint32(f"{arch}.attention.head_count_kv", m["head_count_kv"])
    if m["head_dim"] * m["head_count"] != m["embedding_length"]:
        w.add_uint32(f"{arch}.attention.key_length", m["head_dim"])
        w.add_uint32(f"{arch}.attention.value_length", m["head_dim"])
    w.add_uint32(f"{arch}.rope.dimension_count", m["head_dim"])
    w.add_float32(f"{arch}.rope.freq_base", m["rope_theta"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", m["rms_norm_eps"])
    w.add_uint32(f"{arch}.vocab_size", m["vocab_size"])
    if m["sliding_window"]:
        w.add_uint32(f"{arch}.attention.sliding_window", m["sliding_window"])
    if m["rope_scaling"]:
        w.add_string(f"{arch}.rope.scaling.type", m["rope_scaling"]["type"])
        w.add_float32(f"{arch}.rope.scaling.factor", float(m["rope_scaling"]["factor"]))
    if vocab is not None:
        # llama.cpp's names: real Qwen3 GGUFs name qwen2's pre-tokenizer; GPT-2's is "gpt-2"
        write_gguf_tokenizer(w, vocab, "qwen2" if arch == "qwen3" else "gpt-2")


def write_gguf_tokenizer(w, vocab, pre: str = "gpt-2") -> None:
    """`vocab` (a ByteVocab) as a gpt2-style GGUF tokenizer with a ChatML template, on GGUFWriter `w`."""
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", vocab.tokens)
    w.add_array("tokenizer.ggml.token_type", vocab.token_types)
    w.add_array("tokenizer.ggml.merges", vocab.merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", vocab.bos_id)
    w.add_uint32("tokenizer.ggml.eos_token_id", vocab.eos_id)
    w.add_uint32("tokenizer.ggml.padding_token_id", vocab.pad_id)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_string("tokenizer.chat_template", CHATML_TEMPLATE)


def _stored(t: TensorPlan, ty: str) -> tuple[tuple[int, ...], np.dtype, int, object]:
    """(stored shape, numpy dtype, bytes, GGML raw type or None) of tensor `t` stored as `ty`."""
    import gguf

    if ty in ("F32", "F16"):
        dt = np.dtype(np.float32 if ty == "F32" else np.float16)
        return t.shape, dt, int(np.prod(t.shape)) * dt.itemsize, None
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ty]]
    byte_shape = (*t.shape[:-1], t.shape[-1] // block * size)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), gguf.GGMLQuantizationType[ty]


def _progress_for(plan: list[TensorPlan], types: dict[str, str], progress: bool | None, path):
    return _progress(sum(_stored(t, types[t.name])[2] for t in plan), progress, os.path.basename(os.fspath(path)))


def _values(t: TensorPlan, ty: str, rng: np.random.Generator, std: float, rope_freqs) -> np.ndarray:
    if t.kind == "rope_freqs":
        return np.asarray(rope_freqs, dtype=np.float32)
    if ty == "F32":
        return _float_values(rng, t, std)
    if ty == "F16":
        return _float_values(rng, t, std).astype(np.float16)
    if ty == "BF16":
        return _to_bf16_bytes(_float_values(rng, t, std)).view(np.uint8).reshape(*t.shape[:-1], -1)
    if ty in QUANT_FORMATS:
        return _packed_values(rng, ty, t, std)
    shape, _, nbytes, _ = _stored(t, ty)  # a type lowgear cannot read (for error tests): random bytes
    return _random_bytes(rng, nbytes).reshape(shape)


def _write_tensors(w, plan: list[TensorPlan], types: dict[str, str], seed: int, std: float, rope_freqs, bar) -> None:
    """Tensor infos, then each tensor's data, generated one at a time (seeded by its index)."""
    for t in plan:
        shape, dt, nbytes, raw = _stored(t, types[t.name])
        w.add_tensor_info(t.name, shape, dt, nbytes, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, t in enumerate(plan):
        arr = _values(t, types[t.name], np.random.default_rng([seed, i]), std, rope_freqs)
        w.write_tensor_data(arr)
        if bar is not None:
            bar.update(arr.nbytes)
    if bar is not None:
        bar.close()
