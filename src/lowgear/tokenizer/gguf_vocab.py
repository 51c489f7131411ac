"""Turning a GGUF file's tokenizer metadata into a `tokenizers.Tokenizer`.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, its merges or scores, token types
and special ids as metadata keys (`tokenizer.ggml.*`). This module owns reading those keys
(`read_gguf_vocab`) and rebuilding the tokenizer they describe (`build_tokenizer`), so that token ids
match what the model was trained with. Two vocabulary kinds are supported:

- "gpt2": byte-level BPE. The merges are in the file; the pre-tokenizer (how text is cut before BPE)
  is not, only its name (`tokenizer.ggml.pre`), which `PRE_TOKENIZERS` maps to the split rules.
- "llama": SentencePiece-style BPE over "▁"-spelled pieces with `<0xNN>` byte fallback. Merges are
  usually absent and are derived from the piece scores: a merge ranks as high as the piece it makes.

Tokens typed CONTROL become special added tokens (matched whole only when asked), USER_DEFINED ones
plain added tokens (always matched whole), the way llama.cpp treats them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import ModelFormatError, UnsupportedError

log = logging.getLogger(__name__)

# llama.cpp's token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's spelling of a space


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte → printable character table: printable Latin-1 bytes stand for themselves, the
    others are moved to code points 256 and up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


BYTE_TO_CHAR = byte_alphabet()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


# Split rules per `tokenizer.ggml.pre` name. These are facts about how each model family's merges
# were learned: GPT-2's contraction/letters/numbers/punctuation/space rule, Llama 3's variant with
# numbers in groups of up to three, Qwen2's with single digits.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-4o's o200k rule (Phi-4-mini's tokenizer, GGUF pre "gpt-4o"): letter runs split at case changes,
# contractions kept with their word, numbers in runs of up to three digits.
GPT4O_SPLIT = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
# DeepSeek Coder cuts on newlines, words with one leading space, punctuation runs, CJK runs, digits.
DEEPSEEK_CODER_SPLITS = [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"]


def _gpt2():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _regex_then_bytes(pattern: str):
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def _digits_then_gpt2():
    # StarCoder / SmolLM: every digit is its own piece, then GPT-2's rule on the text between them.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _deepseek_coder():
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in DEEPSEEK_CODER_SPLITS]
    return pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


PRE_TOKENIZERS = {
    "default": _gpt2,
    "gpt-2": _gpt2,
    "gpt2": _gpt2,
    "llama-bpe": lambda: _regex_then_bytes(LLAMA3_SPLIT),
    "llama3": lambda: _regex_then_bytes(LLAMA3_SPLIT),
    "llama-v3": lambda: _regex_then_bytes(LLAMA3_SPLIT),
    "smaug-bpe": lambda: _regex_then_bytes(LLAMA3_SPLIT),
    "dbrx": lambda: _regex_then_bytes(LLAMA3_SPLIT),
    "falcon3": lambda: _regex_then_bytes(LLAMA3_SPLIT),
    "qwen2": lambda: _regex_then_bytes(QWEN2_SPLIT),
    "deepseek-r1-qwen": lambda: _regex_then_bytes(QWEN2_SPLIT),
    "megrez": lambda: _regex_then_bytes(QWEN2_SPLIT),
    "gpt-4o": lambda: _regex_then_bytes(GPT4O_SPLIT),
    "smollm": _digits_then_gpt2,
    "starcoder": _digits_then_gpt2,
    "refact": _digits_then_gpt2,
    "deepseek-coder": _deepseek_coder,
}


@dataclass
class GGUFVocab:
    """The tokenizer metadata of one GGUF file, under plain names."""

    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    eot_token_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = True
    chat_template: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def byte_level(self) -> bool:
        return self.model == "gpt2"


def read_gguf_vocab(path: str | os.PathLike, metadata: Callable[[str], Any] | None = None) -> GGUFVocab:
    """Read the `tokenizer.*` keys of a GGUF file (the header only, not the weights).

    `metadata(key) -> value or None` reuses a header already parsed (the weights source's); without
    it the file is opened with gguf's reader.
    """
    path = os.fspath(path)
    if metadata is None:
        metadata = _open_metadata(path)

    def _value(key, default=None):
        try:
            value = metadata(key)
        except UnicodeDecodeError:
            raise ModelFormatError(f"{path!r}: metadata {key} is not valid UTF-8: the file is corrupt; re-download it") from None
        if value is None:
            return default
        kind = _KEY_TYPES.get(key.rpartition(".")[2])
        if kind is not None and not _is(value, kind):
            raise ModelFormatError(
                f"{path!r}: metadata {key} is {_describe(value)}, not {kind}: the file's tokenizer is corrupt; re-download or re-convert it"
            )
        return value

    model = _value("tokenizer.ggml.model")
    tokens = _value("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise ModelFormatError(
            f"{path!r} has no tokenizer metadata (tokenizer.ggml.model / tokenizer.ggml.tokens): "
            "convert the model again with llama.cpp's convert_hf_to_gguf.py, or load the tokenizer from the HF folder"
        )
    if model not in ("gpt2", "llama"):
        raise UnsupportedError(
            f"{path!r} uses tokenizer model {model!r}; lowgear supports 'gpt2' (byte-level BPE) and "
            "'llama' (SentencePiece BPE): load the tokenizer from the model's HF folder instead"
        )
    types = _value("tokenizer.ggml.token_type")
    if types is None:
        types = _guess_token_types(tokens, model)
    if len(types) != len(tokens):
        raise ModelFormatError(f"{path!r}: {len(tokens)} tokens but {len(types)} token types: the file is corrupt")

    def token_id(key):
        v = _value(f"tokenizer.ggml.{key}")
        return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

    add_bos = _value("tokenizer.ggml.add_bos_token")
    return GGUFVocab(
        model=model,
        pre=_value("tokenizer.ggml.pre"),
        tokens=list(tokens),
        token_types=[int(t) for t in types],
        scores=_value("tokenizer.ggml.scores"),
        merges=_value("tokenizer.ggml.merges"),
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"),
        pad_token_id=token_id("padding_token_id"),
        unk_token_id=token_id("unknown_token_id"),
        eot_token_id=token_id("eot_token_id"),
        # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise
        add_bos=bool(add_bos) if add_bos is not None else model == "llama",
        add_eos=bool(_value("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(_value("tokenizer.ggml.add_space_prefix", model == "llama")),
        chat_template=_value("tokenizer.chat_template"),
    )


# the type each tokenizer key must have (by its last dotted part)
_KEY_TYPES = {
    "model": "a string", "pre": "a string", "chat_template": "a string",
    "tokens": "a list of strings", "merges": "a list of strings",
    "token_type": "a list of integers", "scores": "a list of numbers",
    "bos_token_id": "an integer", "eos_token_id": "an integer", "padding_token_id": "an integer",
    "unknown_token_id": "an integer", "eot_token_id": "an integer",
}


def _is(value, kind: str) -> bool:
    number = (int, float)
    if kind == "a string":
        return isinstance(value, str)
    if kind == "an integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if not isinstance(value, list):
        return False
    item = {"a list of strings": str, "a list of integers": int, "a list of numbers": number}[kind]
    return all(isinstance(v, item) and not isinstance(v, bool) for v in value)


def _describe(value) -> str:
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a list of {'/'.join(kinds) or 'nothing'}"
    return f"a {type(value).__name__} ({value!r:.40})"


def _open_metadata(path: str) -> Callable[[str], Any]:
    import gguf

    try:
        fields = gguf.GGUFReader(path).fields
    except Exception as e:  # the gguf package raises plain ValueError/struct errors on bad files
        raise ModelFormatError(f"{path!r} is not a readable GGUF file ({e}): check the file is complete") from e

    def get(key):
        f = fields.get(key)
        return None if f is None else f.contents()

    return get


def _guess_token_types(tokens: list[str], model: str) -> list[int]:
    """Old files have no token types: byte pieces and <...> markers are the only ones to tell apart."""
    types = []
    for t in tokens:
        if model == "llama" and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(BYTE)
        elif t in ("<unk>",):
            types.append(UNKNOWN)
        elif t.startswith("<") and t.endswith(">") and len(t) > 2 and " " not in t:
            types.append(CONTROL)
        else:
            types.append(NORMAL)
    return types


def build_tokenizer(vocab: GGUFVocab) -> HFTokenizer:
    """The `tokenizers.Tokenizer` a GGUF's metadata describes."""
    tok = _byte_level_bpe(vocab) if vocab.byte_level else _sentencepiece_bpe(vocab)
    _add_marked_tokens(tok, vocab)
    return tok


def _byte_level_bpe(vocab: GGUFVocab) -> HFTokenizer:
    if vocab.merges is None:
        raise ModelFormatError("this GGUF's byte-level (gpt2) vocabulary has no tokenizer.ggml.merges: the file is incomplete")
    ids = {}
    for i, t in enumerate(vocab.tokens):
        # Tokens the converter stored as raw text (outside the byte alphabet) are respelled, so the
        # BPE model sees one alphabet; they are added tokens in practice and matched as text.
        ids.setdefault(t if all(c in CHAR_TO_BYTE for c in t) else "".join(BYTE_TO_CHAR[b] for b in t.encode()), i)
    merges = []
    for m in vocab.merges:
        left, sep, right = m.partition(" ") if isinstance(m, str) else ("", "", "")
        if not sep:
            raise ModelFormatError(f"malformed merge {m!r} in tokenizer.ggml.merges: the file is corrupt; re-download it")
        merges.append((left, right))
    _check_merges(merges, ids)
    tok = _bpe(models.BPE, vocab=ids, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=False)
    factory = PRE_TOKENIZERS.get(vocab.pre or "default")
    if factory is None:
        log.warning("unknown pre-tokenizer %r in the GGUF: splitting text the GPT-2 way; token ids may differ from the model's own tokenizer", vocab.pre)
        factory = _gpt2
    tok.pre_tokenizer = factory()
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(vocab: GGUFVocab) -> HFTokenizer:
    ids = {}
    for i, t in enumerate(vocab.tokens):
        ids.setdefault(t, i)
    if vocab.merges:
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else (m,) for m in vocab.merges]
        bad = next((m for m in merges if len(m) != 2), None)
        if bad is not None:
            raise ModelFormatError(f"malformed merge {' '.join(map(str, bad))!r} in tokenizer.ggml.merges: the file is corrupt; re-download it")
        _check_merges(merges, ids)
    else:
        if vocab.scores is None or len(vocab.scores) != len(vocab.tokens):
            raise ModelFormatError("this GGUF's SentencePiece (llama) vocabulary has no tokenizer.ggml.scores: the file is incomplete")
        merges = derive_merges(vocab.tokens, vocab.scores, vocab.token_types)
    unk = vocab.tokens[vocab.unk_token_id] if vocab.unk_token_id is not None else None
    tok = _bpe(models.BPE, vocab=ids, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    # llama.cpp puts a space before every stretch of text that starts the input or follows a special
    # token; a normalizer runs on exactly those stretches.
    replace = normalizers.Replace(" ", SPIECE_SPACE)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), replace]) if vocab.add_space_prefix else replace
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _check_merges(merges: list[tuple[str, str]], ids: dict[str, int]) -> None:
    """Each merge joins two tokens of the vocabulary into a third; name the first one that does not."""
    for n, (left, right) in enumerate(merges):
        for part in (left, right, left + right):
            if part not in ids:
                raise ModelFormatError(
                    f"tokenizer.ggml.merges[{n}] ({left + ' ' + right!r}) names {part!r}, which is not in "
                    "tokenizer.ggml.tokens: the file's tokenizer is corrupt; re-download or re-convert it"
                )


def _bpe(model, **kwargs) -> HFTokenizer:
    try:
        return HFTokenizer(model(**kwargs))
    except Exception as e:  # the tokenizers library raises a bare Exception for a bad vocabulary
        raise ModelFormatError(f"the GGUF's tokenizer cannot be built ({e}): the file is corrupt; re-download or re-convert it") from None


def derive_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by SentencePiece scores.

    SentencePiece BPE joins, at each step, the adjacent pair whose joined piece scores highest. The
    same happens in a merge-rank BPE if every split of a piece into two known pieces is a merge ranked
    by the joined piece's score (best first); ties go to the lower token id, then the longer left part.
    """
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (NORMAL, UNUSED) and t}
    found = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                found.append((-scores[i], i, -cut, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _add_marked_tokens(tok: HFTokenizer, vocab: GGUFVocab) -> None:
    """Register CONTROL tokens as special added tokens and USER_DEFINED ones as plain added tokens,
    each under the id the file gives it."""
    known = tok.get_vocab(with_added_tokens=False)
    special, plain = [], []
    for i, (t, ty) in enumerate(zip(vocab.tokens, vocab.token_types)):
        if ty not in (CONTROL, USER_DEFINED, UNKNOWN) or known.get(t) != i:
            # not marked, or its spelling was changed for the BPE alphabet (a mislabel in practice)
            continue
        (plain if ty == USER_DEFINED else special).append(AddedToken(t, special=ty != USER_DEFINED, normalized=False))
    if special:
        tok.add_special_tokens(special)
    if plain:
        tok.add_tokens(plain)
