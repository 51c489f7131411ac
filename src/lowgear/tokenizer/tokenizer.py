"""`Tokenizer`: text ↔ token ids for one model, with the ExLlamaV2-shaped API the generators use.

It owns the model's vocabulary facts (special ids, stop tokens, the bytes each token stands for)
and hides where the vocabulary came from: a GGUF file's metadata (rebuilt by `gguf_vocab`) or a
Hugging Face folder's tokenizer.json. The actual splitting and merging is done by the `tokenizers`
library, so encoding is fast and matches the reference implementation.

Special tokens (like `<|im_start|>`) are matched as single tokens only when the caller says the
text may contain them (`encode_special_tokens=True`); otherwise they are ordinary text, so user
input cannot forge a turn boundary. Streaming decoders use `token_bytes_table()` to rebuild text
incrementally without splitting a UTF-8 character between tokens.
"""

from __future__ import annotations

import json
import os
from functools import cached_property

import torch
from tokenizers import Tokenizer as HFTokenizer

from ..errors import LowgearError, ModelFormatError
from . import gguf_vocab as gv
from .chat import render_chat

# End-of-turn markers of common chat formats; those present as special tokens also stop generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>")


def _source_path(source) -> str:
    path = getattr(source, "model_dir", source)
    if path is None:
        raise ModelFormatError("the Config has no model path: set config.model_dir before creating a Tokenizer")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFormatError(f"tokenizer source {path!r} does not exist: give a .gguf file or a Hugging Face model folder")
    return path


def _parsed_metadata(source):
    """A Config's already-opened weights source reads GGUF keys without parsing the header again."""
    if isinstance(source, (str, os.PathLike)):
        return None
    weights = getattr(source, "_source", None) or getattr(source, "source", None)
    getter = getattr(weights, "metadata", None)
    if not callable(getter) or os.fspath(getattr(weights, "path", "")) != os.fspath(source.model_dir):
        return None
    return lambda key: getter(key, None)


class Tokenizer:
    """Tokenizer(config_or_path): a lowgear Config, a .gguf file or a Hugging Face model folder."""

    def __init__(self, source):
        self.path = _source_path(source)
        if os.path.isdir(self.path):
            self._load_hf_folder(self.path)
        else:
            self._load_gguf(self.path, _parsed_metadata(source))
        _check_fits_model(self, source)
        # A twin that reads special-token text as plain text: the default for encode(), kept as a
        # second object so no per-call flag flips shared state.
        self._text_tok = HFTokenizer.from_str(self._tok.to_str())
        self._text_tok.encode_special_tokens = True
        self._tok.encode_special_tokens = False

    # ------------------------------------------------------------------ loading

    def _load_gguf(self, path: str, metadata=None) -> None:
        vocab = gv.read_gguf_vocab(path, metadata)
        try:
            self._tok = gv.build_tokenizer(vocab)
        except ModelFormatError as e:
            raise ModelFormatError(f"{path}: {e}") from None
        self.pieces = vocab.tokens
        self.byte_level = vocab.byte_level
        self.special_ids = {i for i, t in enumerate(vocab.token_types) if t in (gv.CONTROL, gv.UNKNOWN)}
        self.bos_token_id = vocab.bos_token_id
        self.eos_token_id = vocab.eos_token_id
        self.pad_token_id = vocab.pad_token_id
        self.unk_token_id = vocab.unk_token_id
        self.add_bos_default = vocab.add_bos
        self.add_eos_default = vocab.add_eos
        self.chat_template = vocab.chat_template
        self._extra_stop = {vocab.eot_token_id} if vocab.eot_token_id is not None else set()

    def _load_hf_folder(self, folder: str) -> None:
        tj = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(tj):
            raise ModelFormatError(
                f"{folder!r} has no tokenizer.json: lowgear reads fast-tokenizer files only; "
                "save the tokenizer with transformers (tokenizer.save_pretrained) or use the GGUF"
            )
        try:
            self._tok = HFTokenizer.from_file(tj)
        except Exception as e:
            raise ModelFormatError(f"{tj!r} could not be read ({e}): the file is corrupt or from a newer tokenizers") from e
        spec = json.loads(open(tj, encoding="utf-8").read())
        cfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
        model_cfg = _read_json(os.path.join(folder, "config.json"))
        gen_cfg = _read_json(os.path.join(folder, "generation_config.json"))

        size = self._tok.get_vocab_size(with_added_tokens=True)
        self.pieces = [self._tok.id_to_token(i) or "" for i in range(size)]
        self.byte_level = _decoder_kind(spec.get("decoder")) == "byte_level"
        self.special_ids = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}

        def token_id(name):
            value = cfg.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and self._tok.token_to_id(value) is not None:
                return self._tok.token_to_id(value)
            fallback = model_cfg.get(f"{name}_id")
            return fallback[0] if isinstance(fallback, list) and fallback else fallback

        self.bos_token_id = token_id("bos_token")
        self.eos_token_id = token_id("eos_token")
        self.pad_token_id = token_id("pad_token")
        self.unk_token_id = token_id("unk_token")
        self.add_bos_default = bool(cfg.get("add_bos_token", False))
        self.add_eos_default = bool(cfg.get("add_eos_token", False))
        self.chat_template = _hf_chat_template(folder, cfg)
        eos = gen_cfg.get("eos_token_id")
        self._extra_stop = set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])

    # ------------------------------------------------------------------ vocabulary facts

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @cached_property
    def stop_token_ids(self) -> set[int]:
        """eos plus the end-of-turn tokens of common chat formats that this vocabulary has."""
        stops = set(self._extra_stop)
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        for piece in END_OF_TURN_TOKENS:
            i = self.piece_to_id(piece)
            if i is not None and i in self.special_ids:
                stops.add(i)
        return stops

    def id_to_piece(self, token_id: int) -> str:
        """The token as the vocabulary spells it (byte-level alphabet or "▁" pieces)."""
        return self.pieces[token_id]

    def piece_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    @property
    def bos_token(self) -> str:
        return self.pieces[self.bos_token_id] if self.bos_token_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self.pieces[self.eos_token_id] if self.eos_token_id is not None else ""

    def _pad_id(self) -> int:
        for candidate in (self.pad_token_id, self.eos_token_id):
            if candidate is not None:
                return candidate
        return 0

    def to_json(self) -> str:
        """The tokenizer as Hugging Face tokenizers' JSON (what grammar libraries read)."""
        return self._tok.to_str()

    # ------------------------------------------------------------------ encode

    def encode_ids(self, text: str, add_bos: bool = False, add_eos: bool = False, encode_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode_ids takes a str, not {type(text).__name__}")
        tok = self._tok if encode_special_tokens else self._text_tok
        ids = tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            ids.insert(0, self._require("bos_token_id"))
        if add_eos:
            ids.append(self._require("eos_token_id"))
        return ids

    def encode(
        self,
        text: str | list[str],
        add_bos: bool = False,
        add_eos: bool = False,
        encode_special_tokens: bool = False,
    ) -> torch.Tensor:
        """Token ids as a LongTensor [1, n]; a list of texts gives [b, n], right-padded with pad_token_id."""
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.encode_ids(t, add_bos=add_bos, add_eos=add_eos, encode_special_tokens=encode_special_tokens) for t in texts]
        width = max((len(r) for r in rows), default=0)
        out = torch.full((len(rows), width), self._pad_id(), dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def _require(self, name: str) -> int:
        value = getattr(self, name)
        if value is None:
            raise LowgearError(f"this model's tokenizer defines no {name.removesuffix('_id')}: call encode without it")
        return value

    # ------------------------------------------------------------------ decode

    def decode(self, ids, decode_special_tokens: bool = False) -> str | list[str]:
        """Text from ids: a 1-D tensor or list gives a str, a 2-D tensor or list of lists a list of str.
        Negative ids (masks) are dropped."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 2:
                raise ValueError(f"decode takes a 1-D or 2-D tensor, not {ids.dim()}-D")
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], (list, tuple)):
            return [self._decode_one(row, decode_special_tokens) for row in ids]
        return self._decode_one(ids, decode_special_tokens)

    def _decode_one(self, ids, decode_special_tokens: bool) -> str:
        ids = [int(i) for i in ids if i >= 0]
        return self._tok.decode(ids, skip_special_tokens=not decode_special_tokens)

    # ------------------------------------------------------------------ bytes per token

    def token_bytes(self, token_id: int, decode_special_tokens: bool = False) -> bytes:
        """The exact bytes a token stands for. Special tokens give b"" unless asked for. A
        SentencePiece "▁" is a space here: the decoder's removal of the one leading space that the
        tokenizer prepended is the caller's business (`decode` does it)."""
        piece = self.pieces[token_id]
        if token_id in self.special_ids:
            return piece.encode("utf-8") if decode_special_tokens else b""
        if self.byte_level:
            if all(c in gv.CHAR_TO_BYTE for c in piece):
                return bytes(gv.CHAR_TO_BYTE[c] for c in piece)
            return piece.encode("utf-8")
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace(gv.SPIECE_SPACE, " ").encode("utf-8")

    def token_bytes_table(self, decode_special_tokens: bool = False) -> list[bytes]:
        """token_bytes for every id, computed once per setting."""
        cache = self.__dict__.setdefault("_bytes_tables", {})
        if decode_special_tokens not in cache:
            cache[decode_special_tokens] = [self.token_bytes(i, decode_special_tokens) for i in range(self.vocab_size)]
        return cache[decode_special_tokens]

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """The prompt text for a conversation, rendered with the model's own template (ChatML if it has none)."""
        return render_chat(
            messages,
            self.chat_template,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **variables,
        )


def _check_fits_model(tok: "Tokenizer", source) -> None:
    """A vocabulary larger than the model's embedding table would index past it on the first step."""
    spec = getattr(source, "spec", None)
    rows = getattr(spec, "vocab_size", None)
    if not isinstance(rows, int) or tok.vocab_size <= rows:
        return
    raise ModelFormatError(
        f"{tok.path}: the tokenizer has {tok.vocab_size} tokens but the model's embedding table has {rows} rows; "
        "ids past it have no embedding: the tokenizer does not belong to these weights; use the model's own tokenizer files"
    )


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path!r} is not valid JSON ({e}): the model folder is corrupt") from e


def _decoder_kind(decoder: dict | None) -> str:
    if not decoder:
        return "other"
    if decoder.get("type") == "ByteLevel":
        return "byte_level"
    if decoder.get("type") == "Sequence":
        kinds = {_decoder_kind(d) for d in decoder.get("decoders", [])}
        return "byte_level" if "byte_level" in kinds else "other"
    return "other"


def _hf_chat_template(folder: str, cfg: dict) -> str | None:
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return template
