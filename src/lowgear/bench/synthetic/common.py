"""What both synthetic writers share: the byte-level vocabulary, the tensor plan of a Llama-family
model, and random values (float, or well-formed packed blocks) for each tensor."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError
from ...formats.blocks import FLOAT_TYPES, QUANT_FORMATS
from ...formats.spec import QK_NORM_ARCHITECTURES

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
        if arch in QK_NORM_ARCHITECTURES:  # qwen3: per-head RMSNorm weights of q and k
            plan.append(TensorPlan(n("q_norm"), (head_dim,), "norm"))
            plan.append(TensorPlan(n("k_norm"), (head_dim,), "norm"))
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
    "Q2_K": ([(80, 1.0), (82, 1.5)], 1 / 14.4),
    "Q3_K": ([(108, 1.0)], 1 / 43.5),
    "IQ4_NL": ([(0, 1.0)], 1 / 69.4),
    "IQ4_XS": ([(0, 1.0)], 1 / 1326.0),
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




def synthetic_vocab(tokenizer: str | None, vocab_size: int | None) -> tuple[ByteVocab | None, int]:
    """The vocabulary a writer stores ("gpt2-bytes": `byte_vocab(vocab_size)`; None: none) and the vocab size."""
    if tokenizer == "gpt2-bytes":
        vocab = byte_vocab(vocab_size or 0)
        return vocab, len(vocab.tokens)
    if tokenizer is not None:
        raise ConfigError(f"unknown synthetic tokenizer {tokenizer!r}: use 'gpt2-bytes' or None")
    return None, vocab_size or 256
