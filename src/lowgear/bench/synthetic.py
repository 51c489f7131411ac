"""Random models written to disk, for tests and benchmarks: a GGUF file or a Hugging Face folder.

`write_gguf` makes a complete, runnable GGUF: real metadata, a small byte-level (gpt2) tokenizer
with ChatML special tokens and a chat template, and random weights in any type lowgear reads.
`write_hf` makes config.json + safetensors (+ tokenizer.json) the way a Hugging Face checkpoint
looks. Both generate and write one tensor at a time, so real shapes (Llama-3-8B: hidden 4096, 32
layers, 32/8 heads, ffn 14336, vocab 128256) are writable without holding the model in memory;
big writes show a tqdm bar.

Quantized tensors are made by gguf-py's quantizer from random normal weights when it has one for
the type and the tensor is small (< QUANTIZE_MAX_ELEMENTS); otherwise as random well-formed
blocks (random bits, scales chosen so weights have about the requested std) — fast enough for an
8B model. A tensor whose row length is not a whole number of blocks is stored as F16 instead, as
llama.cpp's quantizer does.

For llama/mistral GGUFs real files have q/k rows permuted (llama.cpp's converter, for its
interleaved RoPE); random weights have no "unpermuted" original, so nothing is permuted here, and
the GGUF and HF writers do not produce the same model from the same seed.

This module does not import transformers (`lowgear bench` uses it at runtime).
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import ConfigError
from ..formats.blocks import FLOAT_TYPES, QUANT_FORMATS

QUANTIZE_MAX_ELEMENTS = 1 << 22
PROGRESS_MIN_BYTES = 256 << 20
WEIGHT_STD = 0.02
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A few merges over GPT-2's byte alphabet ("Ġ" is the byte for a space); each adds a token.
_MERGES = (("Ġ", "t"), ("h", "e"), ("i", "n"), ("e", "r"), ("o", "n"), ("Ġt", "he"), ("a", "n"), ("Ġ", "a"), ("r", "e"), ("o", "u"))


# ------------------------------------------------------------------------------------- tokenizer


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


@dataclass(frozen=True)
class ByteVocab:
    tokens: list[str]
    token_types: list[int]  # llama.cpp's: 1 normal, 3 control, 5 unused
    merges: list[str]
    bos_id: int
    eos_id: int
    pad_id: int


def byte_vocab(min_size: int = 0, regular: int = 0) -> ByteVocab:
    """256 byte tokens (id = byte value), merged tokens, ChatML specials, padded to min_size.

    `regular` fills the ordinary (BPE) part up to that many tokens before the specials, as a real
    large vocabulary is (Llama 3: 128000 ordinary, 256 special): with two-byte merges of the byte
    alphabet in order, then three-byte ones (a two-byte token and a byte). Left at 0, the padding
    is reserved special tokens, which a tokenizer library keeps in a separate, slower table.
    """
    tokens = byte_alphabet()
    merges = []
    for a, b in _MERGES:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    if regular > len(tokens):
        seen, alphabet = set(tokens), tokens[:256]
        pairs = [(a, b) for a in alphabet for b in alphabet]
        triples = ((a + b, c) for a, b in pairs for c in alphabet)
        for a, b in itertools.chain(pairs, triples):
            if len(tokens) >= regular:
                break
            if a + b not in seen:
                seen.add(a + b)
                merges.append(f"{a} {b}")
                tokens.append(a + b)
    types = [1] * len(tokens)
    specials = {}
    for s in SPECIAL_TOKENS:
        specials[s] = len(tokens)
        tokens.append(s)
        types.append(3)
    while len(tokens) < min_size:
        tokens.append(f"<|reserved_{len(tokens)}|>")
        types.append(5)
    return ByteVocab(tokens, types, merges, specials["<|im_start|>"], specials["<|im_end|>"], specials["<|endoftext|>"])


# ------------------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class TensorPlan:
    name: str  # in the target format's naming
    shape: tuple[int, ...]  # torch order
    kind: str  # "linear", "embed", "norm", "bias"


def _plan(arch, hidden, layers, heads, kv_heads, head_dim, inter, vocab, tied, bias, names) -> list[TensorPlan]:
    plan = [TensorPlan(names["embed"], (vocab, hidden), "embed")]
    for i in range(layers):
        def n(key: str) -> str:
            return names[key].format(i=i)

        plan.append(TensorPlan(n("attn_norm"), (hidden,), "norm"))
        plan.append(TensorPlan(n("q"), (heads * head_dim, hidden), "linear"))
        plan.append(TensorPlan(n("k"), (kv_heads * head_dim, hidden), "linear"))
        plan.append(TensorPlan(n("v"), (kv_heads * head_dim, hidden), "linear"))
        if bias:
            plan.append(TensorPlan(n("q_bias"), (heads * head_dim,), "bias"))
            plan.append(TensorPlan(n("k_bias"), (kv_heads * head_dim,), "bias"))
            plan.append(TensorPlan(n("v_bias"), (kv_heads * head_dim,), "bias"))
        plan.append(TensorPlan(n("o"), (hidden, heads * head_dim), "linear"))
        plan.append(TensorPlan(n("ffn_norm"), (hidden,), "norm"))
        plan.append(TensorPlan(n("gate"), (inter, hidden), "linear"))
        plan.append(TensorPlan(n("up"), (inter, hidden), "linear"))
        plan.append(TensorPlan(n("down"), (hidden, inter), "linear"))
    plan.append(TensorPlan(names["norm"], (hidden,), "norm"))
    if not tied:
        plan.append(TensorPlan(names["lm_head"], (vocab, hidden), "linear"))
    return plan


def _float_values(rng: np.random.Generator, t: TensorPlan, std: float) -> np.ndarray:
    if t.kind == "norm":
        return (1.0 + 0.1 * rng.standard_normal(t.shape, dtype=np.float32)).astype(np.float32)
    return rng.standard_normal(t.shape, dtype=np.float32) * np.float32(std)


# Per format: the f16 fields (byte offset, multiplier of the base scale) that random blocks get, and
# the base scale that gives weights of std ~1 (q's spread times the random sub-scales' spread).
SCALE_FIELDS = {
    "Q8_0": ([(0, 1.0)], 1 / 74.0),
    "Q4_0": ([(0, 1.0)], 1 / 4.6),
    "Q4_1": ([(0, 1.0), (2, -7.5)], 1 / 4.6),
    "Q5_0": ([(0, 1.0)], 1 / 9.2),
    "Q5_1": ([(0, 1.0), (2, -15.5)], 1 / 9.2),
    "Q4_K": ([(0, 1.0), (2, 7.5)], 1 / 270.0),
    "Q5_K": ([(0, 1.0), (2, 15.5)], 1 / 570.0),
    "Q6_K": ([(208, 1.0)], 1 / (18.5 * 74)),
}


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random bytes in one writable allocation (raw 64-bit draws viewed as bytes)."""
    return rng.bit_generator.random_raw(-(-n // 8)).view(np.uint8)[:n]


def random_blocks(rng: np.random.Generator, qtype: str, rows: int, cols: int, std: float = WEIGHT_STD) -> np.ndarray:
    """Random well-formed packed rows uint8 [rows, row_bytes]: random bits, sane finite f16 scales."""
    fmt = QUANT_FORMATS[qtype]
    nblocks = cols // fmt.block_size
    blocks = _random_bytes(rng, rows * nblocks * fmt.block_bytes).reshape(rows, nblocks, fmt.block_bytes)
    fields, base = SCALE_FIELDS[qtype]
    d = (std * base * rng.uniform(0.5, 1.5, (rows, nblocks))).astype(np.float32)
    for offset, mult in fields:
        blocks[..., offset : offset + 2] = (d * mult).astype(np.float16).view(np.uint8).reshape(rows, nblocks, 2)
    return blocks.reshape(rows, -1)


def _packed_values(rng: np.random.Generator, qtype: str, t: TensorPlan, std: float) -> np.ndarray:
    rows, cols = t.shape
    if rows * cols <= QUANTIZE_MAX_ELEMENTS:
        import gguf

        try:
            return gguf.quants.quantize(_float_values(rng, t, std), gguf.GGMLQuantizationType[qtype])
        except NotImplementedError:
            pass  # gguf-py has no quantizer for this type (the K formats): random blocks instead
    return random_blocks(rng, qtype, rows, cols, std)


def _stored_type(t: TensorPlan, qtype: str) -> str:
    if t.kind in ("norm", "bias", "rope_freqs"):
        return "F32"
    fmt = QUANT_FORMATS.get(qtype)
    if fmt is not None and t.shape[-1] % fmt.block_size:
        return "F16"
    return qtype


def _check_type(qtype: str) -> None:
    if qtype not in FLOAT_TYPES and qtype not in QUANT_FORMATS:
        raise ConfigError(f"cannot write weights as {qtype!r}: choose one of {', '.join(FLOAT_TYPES + tuple(QUANT_FORMATS))}")


def _to_bf16_bytes(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    bits = values.astype(np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def _progress(total: int, progress: bool | None, desc: str):
    if progress is None:
        progress = total >= PROGRESS_MIN_BYTES
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc)


def _shapes(arch, hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size):
    num_kv_heads = num_kv_heads or num_heads
    head_dim = head_dim or hidden_size // num_heads
    if num_heads % num_kv_heads:
        raise ConfigError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if head_dim % 2:
        raise ConfigError(f"head_dim ({head_dim}) must be even for RoPE")
    return num_kv_heads, head_dim, intermediate_size or 4 * hidden_size


# ------------------------------------------------------------------------------------- GGUF

_GGUF_NAMES = {
    "embed": "token_embd.weight",
    "attn_norm": "blk.{i}.attn_norm.weight",
    "q": "blk.{i}.attn_q.weight",
    "k": "blk.{i}.attn_k.weight",
    "v": "blk.{i}.attn_v.weight",
    "q_bias": "blk.{i}.attn_q.bias",
    "k_bias": "blk.{i}.attn_k.bias",
    "v_bias": "blk.{i}.attn_v.bias",
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
    vocab = None
    if tokenizer == "gpt2-bytes":
        vocab = byte_vocab(vocab_size or 0)
        vocab_size = len(vocab.tokens)
    elif tokenizer is not None:
        raise ConfigError(f"unknown synthetic tokenizer {tokenizer!r}: use 'gpt2-bytes' or None")
    vocab_size = vocab_size or 256
    bias = arch == "qwen2" if attention_bias is None else attention_bias

    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_name(f"lowgear synthetic {arch}")
    w.add_uint32(f"{arch}.context_length", max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", hidden_size)
    w.add_uint32(f"{arch}.block_count", num_layers)
    w.add_uint32(f"{arch}.feed_forward_length", intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", num_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", num_kv_heads)
    if head_dim * num_heads != hidden_size:
        w.add_uint32(f"{arch}.attention.key_length", head_dim)
        w.add_uint32(f"{arch}.attention.value_length", head_dim)
    w.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    w.add_float32(f"{arch}.rope.freq_base", rope_theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", rms_norm_eps)
    w.add_uint32(f"{arch}.vocab_size", vocab_size)
    if sliding_window:
        w.add_uint32(f"{arch}.attention.sliding_window", sliding_window)
    if rope_scaling:
        w.add_string(f"{arch}.rope.scaling.type", rope_scaling["type"])
        w.add_float32(f"{arch}.rope.scaling.factor", float(rope_scaling["factor"]))
    if vocab is not None:
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", "gpt2")
        w.add_array("tokenizer.ggml.tokens", vocab.tokens)
        w.add_array("tokenizer.ggml.token_type", vocab.token_types)
        w.add_array("tokenizer.ggml.merges", vocab.merges)
        w.add_uint32("tokenizer.ggml.bos_token_id", vocab.bos_id)
        w.add_uint32("tokenizer.ggml.eos_token_id", vocab.eos_id)
        w.add_uint32("tokenizer.ggml.padding_token_id", vocab.pad_id)
        w.add_bool("tokenizer.ggml.add_bos_token", False)
        w.add_string("tokenizer.chat_template", CHATML_TEMPLATE)

    plan = _plan(arch, hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size, vocab_size,
                 tie_word_embeddings, bias, _GGUF_NAMES)
    if rope_freqs is not None:
        plan.append(TensorPlan("rope_freqs.weight", (len(rope_freqs),), "rope_freqs"))
    types = {t.name: (tensor_types or {}).get(t.name, _stored_type(t, qtype)) for t in plan}

    def stored(t: TensorPlan) -> tuple[tuple[int, ...], np.dtype, int, object]:
        ty = types[t.name]
        if ty in ("F32", "F16"):
            dt = np.dtype(np.float32 if ty == "F32" else np.float16)
            return t.shape, dt, int(np.prod(t.shape)) * dt.itemsize, None
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ty]]
        byte_shape = (*t.shape[:-1], t.shape[-1] // block * size)
        return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), gguf.GGMLQuantizationType[ty]

    total = 0
    for t in plan:
        shape, dt, nbytes, raw = stored(t)
        w.add_tensor_info(t.name, shape, dt, nbytes, raw_dtype=raw)
        total += nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    bar = _progress(total, progress, os.path.basename(os.fspath(path)))
    for i, t in enumerate(plan):
        rng = np.random.default_rng([seed, i])
        ty = types[t.name]
        if t.kind == "rope_freqs":
            arr = np.asarray(rope_freqs, dtype=np.float32)
        elif ty == "F32":
            arr = _float_values(rng, t, std)
        elif ty == "F16":
            arr = _float_values(rng, t, std).astype(np.float16)
        elif ty == "BF16":
            arr = _to_bf16_bytes(_float_values(rng, t, std)).view(np.uint8).reshape(*t.shape[:-1], -1)
        elif ty in QUANT_FORMATS:
            arr = _packed_values(rng, ty, t, std)
        else:  # a type lowgear cannot read (for error tests): random bytes of the right size
            arr = _random_bytes(rng, stored(t)[2]).reshape(stored(t)[0])
        w.write_tensor_data(arr)
        if bar is not None:
            bar.update(arr.nbytes)
    if bar is not None:
        bar.close()
    w.close()
    return os.fspath(path)


# ------------------------------------------------------------------------------------- HF folder

_HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "o": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight",
    "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
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
    vocab = None
    if tokenizer == "gpt2-bytes":
        vocab = byte_vocab(vocab_size or 0)
        vocab_size = len(vocab.tokens)
    elif tokenizer is not None:
        raise ConfigError(f"unknown synthetic tokenizer {tokenizer!r}: use 'gpt2-bytes' or None")
    vocab_size = vocab_size or 256
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)

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
    if arch == "qwen2":
        config["use_sliding_window"] = sliding_window is not None
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
