"""`write_hf`: a random Llama-family model as a Hugging Face folder (config.json, safetensors, tokenizer)."""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterator

import numpy as np

from ...errors import ConfigError
from .common import (CHATML_TEMPLATE, WEIGHT_STD, ByteVocab, TensorPlan, _float_values, _plan, _progress, _shapes,
                     _to_bf16_bytes, synthetic_vocab)

_HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "o": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight",
    "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}
_ST_TYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}


def _hf_bytes(rng: np.random.Generator, t: TensorPlan, dtype: str, std: float) -> np.ndarray:
    values = _float_values(rng, t, std)
    if dtype == "float32":
        return values
    if dtype == "float16":
        return values.astype(np.float16)
    return _to_bf16_bytes(values)


def _write_safetensors(path: str, plan: list[TensorPlan], st_type: str, itemsize: int,
                       make: Callable[[TensorPlan], np.ndarray], bar) -> None:
    """Stream one safetensors file: 8-byte header length, JSON header, then each tensor's bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in plan:
        n = int(np.prod(t.shape)) * itemsize
        header[t.name] = {"dtype": st_type, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in plan:
            arr = make(t)
            np.ascontiguousarray(arr).tofile(f)
            if bar is not None:
                bar.update(arr.nbytes)


def _shards(plan: list[TensorPlan], itemsize: int, max_shard_bytes: int | None) -> Iterator[list[TensorPlan]]:
    shard: list[TensorPlan] = []
    size = 0
    for t in plan:
        n = int(np.prod(t.shape)) * itemsize
        if shard and max_shard_bytes and size + n > max_shard_bytes:
            yield shard
            shard, size = [], 0
        shard.append(t)
        size += n
    if shard:
        yield shard


def hf_tokenizer_json(vocab: ByteVocab) -> dict:
    """A Hugging Face tokenizer.json (byte-level BPE) for `vocab`."""
    special = {i for i, ty in enumerate(vocab.token_types) if ty != 1}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": vocab.tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i in sorted(special)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(vocab.tokens) if i not in special},
            "merges": [m.split(" ") for m in vocab.merges],
        },
    }


def write_hf(
    folder: str | os.PathLike,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    head_dim: int | None = None,
    dtype: str = "float32",
    seed: int = 0,
    tokenizer: str | None = "gpt2-bytes",
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-5,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    sliding_window: int | None = None,
    rope_scaling: dict | None = None,
    max_shard_bytes: int | None = None,
    std: float = WEIGHT_STD,
    progress: bool | None = None,
) -> str:
    """Write a random model as a Hugging Face folder (config.json, safetensors, tokenizer files).

    `dtype` is float32, float16 or bfloat16. With `max_shard_bytes` the weights are split into
    shards with a model.safetensors.index.json. `rope_scaling` is in HF's form, e.g.
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}. `arch` is written as given.
    """
    if dtype not in _ST_TYPES:
        raise ConfigError(f"cannot write HF weights as {dtype!r}: choose float32, float16 or bfloat16")
    num_kv_heads, head_dim, intermediate_size = _shapes(arch, hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size)
    vocab, vocab_size = synthetic_vocab(tokenizer, vocab_size)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)

    config = _hf_config(arch, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim,
                        vocab_size, max_position_embeddings, rms_norm_eps, rope_theta, rope_scaling,
                        tie_word_embeddings, sliding_window, dtype, vocab)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    plan = _plan(arch, hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size, vocab_size,
                 tie_word_embeddings, arch == "qwen2", _HF_NAMES)
    st_type, itemsize = _ST_TYPES[dtype]
    index = {t.name: i for i, t in enumerate(plan)}

    def make(t: TensorPlan) -> np.ndarray:
        return _hf_bytes(np.random.default_rng([seed, index[t.name]]), t, dtype, std)

    total = sum(int(np.prod(t.shape)) * itemsize for t in plan)
    bar = _progress(total, progress, os.path.basename(folder))
    shards = list(_shards(plan, itemsize, max_shard_bytes))
    if len(shards) == 1:
        _write_safetensors(os.path.join(folder, "model.safetensors"), plan, st_type, itemsize, make, bar)
    else:
        weight_map = {}
        for k, shard in enumerate(shards):
            name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(os.path.join(folder, name), shard, st_type, itemsize, make, bar)
            weight_map.update({t.name: name for t in shard})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if bar is not None:
        bar.close()

    if vocab is not None:
        write_hf_tokenizer(folder, vocab)
    return folder


def write_hf_tokenizer(folder: str | os.PathLike, vocab: ByteVocab) -> None:
    """tokenizer.json and tokenizer_config.json for `vocab` in a Hugging Face folder."""
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(hf_tokenizer_json(vocab), f, ensure_ascii=False)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": vocab.tokens[vocab.bos_id], "eos_token": vocab.tokens[vocab.eos_id],
                   "pad_token": vocab.tokens[vocab.pad_id], "chat_template": CHATML_TEMPLATE,
                   "add_bos_token": False}, f, indent=2)


def _hf_config(arch, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size,
               max_position_embeddings, rms_norm_eps, rope_theta, rope_scaling, tie_word_embeddings, sliding_window,
               dtype, vocab) -> dict:
    """config.json as Hugging Face writes it for a Llama-family model."""
    config = {
        "architectures": [_HF_CLASSES.get(arch, arch)],
        "model_type": arch,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": tie_word_embeddings,
        "sliding_window": sliding_window,
        "torch_dtype": dtype,
        "bos_token_id": vocab.bos_id if vocab else None,
        "eos_token_id": vocab.eos_id if vocab else None,
    }
    if arch in ("qwen2", "qwen3"):
        config["use_sliding_window"] = sliding_window is not None
    if arch == "qwen3":
        config["attention_bias"] = False
        config["max_window_layers"] = 0  # a window, when given, slides on every layer (lowgear has one per model)
    return config
