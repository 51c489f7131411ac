"""Reading a GGUF file: its metadata into a ModelSpec, its tensors under canonical names.

The file is memory-mapped once (gguf-py's GGUFReader, copy-on-write so torch gets writable views
without copying); every tensor handed out is a zero-copy torch view of that map. Float tensors
(F32, F16, BF16) come back as torch tensors [rows, cols]; quantized ones as `PackedTensor`
(uint8 [rows, row_bytes] in llama.cpp's block layout). GGUF lists dims inner-first (ne0 is the
row length); the views here are already in torch's [rows, cols] order.

Facts a model built from a GGUF must know:
- llama / mistral GGUFs have their q and k rows permuted by llama.cpp's converter so that RoPE
  rotates adjacent pairs: `spec.rope_style == "interleaved"`. qwen2 and qwen3 GGUFs are not
  permuted ("neox"). qwen3's per-head q/k norms are `blk.N.attn_q_norm` / `attn_k_norm`
  ([head_dim]); its head_dim is `qwen3.attention.key_length`.
- llama-3.1-style rope scaling is stored as a `rope_freqs` tensor of per-frequency divisors
  (head_dim / 2 floats): inv_freq[i] = rope_theta ** (-2i / head_dim) / rope_freqs[i]. When present
  it is in `spec.extra["rope_freqs"]` (float32 tensor) and `spec.rope_scaling` is None.
- No `output` tensor means the embedding is tied (`tie_word_embeddings`).
- gemma2 / gemma3: q/k not permuted ("neox"); `blk.N.post_attention_norm` / `post_ffw_norm` are the
  norms after attention and after the MLP, `ffn_norm` the one before the MLP; every norm weight is
  stored with Gemma's + 1 already added by llama.cpp's converter (so it is the multiplier, as the
  canonical names want). The soft-caps are `{arch}.attn_logit_softcapping` /
  `final_logit_softcapping`; which layers slide is `{arch}.attention.sliding_window_pattern` where
  present, else llama.cpp's fixed pattern (gemma2 2, gemma3 6: the last layer of each run is global);
  gemma3's sliding layers rotate with `{arch}.rope.freq_base_swa`, else llama.cpp's fixed 10000, and
  take no rope scaling. The converter writes no query_pre_attn_scalar: the softmax scale follows
  llama.cpp's rule, (hidden / heads)**-0.5 for the 27B models (46 layers gemma2, 62 gemma3),
  head_dim**-0.5 for the others (query_pre_attn_scalar is one of those in every released Gemma 2 / 3).
- phi3 (llama.cpp's names): q|k|v in one `blk.N.attn_qkv`, gate|up in one `blk.N.ffn_up` (gate rows
  first), served as their parts (formats/fused.py); q/k not permuted ("neox"), rotating the first
  `phi3.rope.dimension_count` dims of each head. LongRoPE is two global tensors,
  `rope_factors_short` / `rope_factors_long` (rot / 2 floats each), with the original context in
  `phi3.rope.scaling.original_context_length` and the cos / sin scale in `phi3.rope.scaling.attn_factor`.
- Mixture of experts: llama.cpp writes Mixtral as architecture `llama` with `llama.expert_count` > 0
  (lowgear's spec calls it `mixtral`) and Qwen3-MoE as `qwen3moe` (spec: `qwen3_moe`, experts
  `expert_feed_forward_length` wide). A sparse layer holds the router `blk.N.ffn_gate_inp`
  ([experts, hidden]) and every expert stacked in one tensor each: `ffn_gate_exps` / `ffn_up_exps`
  ([experts, expert_ff, hidden] in torch order), `ffn_down_exps`; `{arch}.expert_used_count` is the top-k and
  `{arch}.expert_weights_norm` (absent: renormalise, as llama.cpp does for both) whether the top-k
  weights are renormalised. Quantized expert stacks come back as one PackedTensor of E*N rows.
  Qwen2-MoE (`qwen2moe`) adds a shared expert (`ffn_{gate,up,down}_shexp`,
  `expert_shared_feed_forward_length` wide) scaled by sigmoid(`ffn_gate_inp_shexp` . x).

A file is checked as it opens (the header in formats/gguf_reader.py): bad magic, a header that does
not parse, tensor data running past the end of the file (truncated download), tensor types lowgear
cannot unpack, and missing layers all raise a lowgear error naming the fix.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np
import torch
from gguf.constants import GGUFValueType

from ..errors import ModelFormatError, UnsupportedError
from .blocks import FLOAT_TYPES, SUPPORTED_TYPES, is_quantized
from .fused import FusedParts, fused_in
from .gguf_reader import _open_reader, check_gguf_magic
from .spec import (GEMMA_ARCHITECTURES, NEOX_GGUF_ARCHITECTURES, QK_NORM_ARCHITECTURES, SUPPORTED_ARCHITECTURES, ModelSpec,
                   PackedTensor, TensorInfo)
from .validate import check_spec, check_tensors

_GLOBAL_NAMES = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn_qkv": "qkv",
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "attn_q_norm": "q_norm",
    "attn_k_norm": "k_norm",
    "post_attention_norm": "post_attn_norm",
    "post_ffw_norm": "post_ffn_norm",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
    "ffn_gate_inp": "router",
    "ffn_gate_exps": "gate_exps",
    "ffn_up_exps": "up_exps",
    "ffn_down_exps": "down_exps",
    "ffn_gate_shexp": "shared_gate",  # qwen2moe's shared expert
    "ffn_up_shexp": "shared_up",
    "ffn_down_shexp": "shared_down",
    "ffn_gate_inp_shexp": "shared_expert_gate",
}
# llama.cpp's architecture names that lowgear's spec calls otherwise (llama with experts is "mixtral")
_SPEC_ARCH = {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe"}
_GGUF_PART = {short: part for part, short in _LAYER_NAMES.items()}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
REQUIRED_LAYER_TENSORS = ("attn_norm", "q", "k", "v", "o", "ffn_norm")  # and the layer's spec.ffn_names
# llama.cpp's Gemma facts the converter does not write (see the module docstring)
GEMMA_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
GEMMA3_LOCAL_ROPE_BASE = 10000.0
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# architectures whose `ffn_up` holds gate|up when the file has no ffn_gate (llama.cpp writes none for them)
FUSED_UP_ARCHITECTURES = ("phi3",)
_ROPE_FACTORS = {"rope_factors_short.weight": "short_factor", "rope_factors_long.weight": "long_factor"}


def canonical_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> lowgear canonical name, or None for tensors the model does not use."""
    m = _LAYER_RE.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        short = _LAYER_NAMES.get(part)
        if short is None:
            return None
        return f"layers.{layer}.{short}" if kind == "weight" else f"layers.{layer}.{short}_bias"
    base, _, kind = gguf_name.rpartition(".")
    if kind == "weight" and base in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[base]
    return None


def _short_float(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


class GGUFSource(FusedParts):
    """A WeightSource over one memory-mapped GGUF file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ModelFormatError(f"model file {self.path!r} does not exist: check the path")
        check_gguf_magic(self.path)
        self.reader = _open_reader(self.path)
        if self.reader.byte_order != "I":
            raise UnsupportedError(f"{self.path} is a big-endian GGUF: lowgear reads little-endian files only; convert it")
        self._tensors: dict[str, Any] = {}  # canonical name -> ReaderTensor
        self.unmapped: list[str] = []
        self._rope_freqs = None
        self._rope_factors: dict[str, Any] = {}  # LongRoPE: "short_factor" / "long_factor" -> ReaderTensor
        self._values: dict[str, Any] = {}
        fused_up = self.metadata("general.architecture") in FUSED_UP_ARCHITECTURES and not any(
            t.name.endswith(".ffn_gate.weight") for t in self.reader.tensors)
        for t in self.reader.tensors:
            canon = canonical_name(t.name)
            if canon is not None and fused_up and canon.endswith(".up"):
                canon = canon[: -len("up")] + "gate_up"
            if canon is not None:
                self._tensors[canon] = t
            elif t.name == "rope_freqs.weight":
                self._rope_freqs = t
            elif t.name in _ROPE_FACTORS:
                self._rope_factors[_ROPE_FACTORS[t.name]] = t
            else:
                self.unmapped.append(t.name)
        for key, field in self.reader.fields.items():  # every string decodes, or the file says which does not
            if field.types and field.types[-1] == GGUFValueType.STRING:
                self.metadata(key)
        try:
            self.spec = self._build_spec()
        except (ValueError, TypeError, OverflowError, ZeroDivisionError) as e:
            raise ModelFormatError(f"{self.path}: a metadata value is malformed ({e}); the file is corrupt; re-download it") from None
        check_spec(self.spec, self.path)
        self._check_tensors()
        self._check_vocab()
        self._split_fused(self.path, self._stored_name)
        check_tensors(self, self.path, self._stored_name)

    def _stored_name(self, canon: str) -> str:
        t = self._tensors.get(self._parts[canon][0] if canon in self._parts else canon)
        return t.name if t is not None else canon

    # metadata ---------------------------------------------------------------------------------

    def metadata(self, key: str, default: Any = None) -> Any:
        """A metadata value (str, number, bool or list), or `default` when the key is absent."""
        if key in self._values:
            return self._values[key]
        field = self.reader.get_field(key)
        if field is None:
            return default
        try:
            value = field.contents()
        except UnicodeDecodeError as e:
            where = key
            if field.types[0] == GGUFValueType.ARRAY:
                for i, idx in enumerate(field.data):
                    try:
                        bytes(field.parts[idx]).decode("utf-8")
                    except UnicodeDecodeError:
                        where = f"{key}[{i}]"
                        break
            raise ModelFormatError(
                f"{self.path}: metadata {where} is not valid UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start}); "
                "the file is corrupt: re-download it"
            ) from None
        except (ValueError, IndexError, TypeError) as e:
            raise ModelFormatError(f"{self.path}: metadata {key} cannot be read ({e}); the file is corrupt: re-download it") from None
        self._values[key] = value
        return value

    def metadata_keys(self) -> list[str]:
        return [k for k in self.reader.fields if not k.startswith("GGUF.")]

    def _require(self, key: str) -> Any:
        value = self.metadata(key)
        if value is None:
            raise ModelFormatError(
                f"{self.path}: metadata key {key!r} is missing; the file was not written by a complete "
                "converter; re-convert or re-download it"
            )
        return value

    def _build_spec(self) -> ModelSpec:
        arch = self.metadata("general.architecture")
        spec_arch = _SPEC_ARCH.get(arch, arch)
        if spec_arch not in SUPPORTED_ARCHITECTURES or spec_arch == "mixtral":
            raise UnsupportedError(
                f"{self.path}: architecture {arch!r} is not supported: lowgear runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (mixtral as llama.cpp writes it: 'llama' with experts)"
            )
        hidden = int(self._require(f"{arch}.embedding_length"))
        heads = int(self._require(f"{arch}.attention.head_count"))
        kv_heads = int(self.metadata(f"{arch}.attention.head_count_kv", heads))
        head_dim = int(self.metadata(f"{arch}.attention.key_length", hidden // heads if heads else 0))
        if "embed" not in self._tensors:
            raise ModelFormatError(f"{self.path}: no token_embd.weight tensor; the file is incomplete; re-download it")
        vocab = self._info("embed").shape[0]

        rope_scaling = self._rope_scaling(arch)
        rotary = self.metadata(f"{arch}.rope.dimension_count")
        extra = self._extra()

        eos = [self.metadata(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
        eos_ids = tuple(dict.fromkeys(int(e) for e in eos if e is not None))
        bos = self.metadata("tokenizer.ggml.bos_token_id")
        window = self.metadata(f"{arch}.attention.sliding_window")
        gemma = arch in GEMMA_ARCHITECTURES
        layers = int(self._require(f"{arch}.block_count"))
        experts = int(self.metadata(f"{arch}.expert_count", 0) or 0)
        if arch == "llama" and experts:
            spec_arch = "mixtral"
        return ModelSpec(
            arch=spec_arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self._require(f"{arch}.feed_forward_length")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_short_float(self.metadata(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=_short_float(self.metadata(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            rope_style="neox" if spec_arch in NEOX_GGUF_ARCHITECTURES else "interleaved",
            max_position_embeddings=int(self.metadata(f"{arch}.context_length", 4096)),
            rotary_dim=int(rotary) if rotary is not None and int(rotary) != head_dim else None,
            tie_word_embeddings="lm_head" not in self._tensors,
            attention_bias="layers.0.q_bias" in self._tensors,
            sliding_window=int(window) if window else None,
            qk_norm=spec_arch in QK_NORM_ARCHITECTURES,
            sliding_layers=self._gemma_layers(arch, layers) if gemma else None,
            rope_local_theta=(_short_float(self.metadata(f"{arch}.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE))
                              if arch == "gemma3" else None),
            attn_scale=self._gemma_scale(arch, layers, hidden, heads, head_dim) if gemma else None,
            attn_softcap=self._positive(f"{arch}.attn_logit_softcapping") if gemma else None,
            final_softcap=self._positive(f"{arch}.final_logit_softcapping") if gemma else None,
            gemma_block=gemma,
            **self._moe(arch),
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_ids=eos_ids,
            name=str(self.metadata("general.name", "")),
            extra=extra,
        )

    def _rope_scaling(self, arch: str) -> dict | None:
        """The spec's rope_scaling: linear from the metadata, or LongRoPE from the two factor tensors (phi3)."""
        rope_scaling = None
        scaling_type = self.metadata(f"{arch}.rope.scaling.type")
        factor = self.metadata(f"{arch}.rope.scaling.factor")
        if scaling_type == "linear" and factor:
            rope_scaling = {"type": "linear", "factor": _short_float(factor)}
        elif scaling_type not in (None, "none", "linear"):
            raise UnsupportedError(
                f"{self.path}: rope scaling {scaling_type!r} is not supported: lowgear handles linear scaling "
                "and llama-3 frequency factors (rope_freqs)"
            )
        if len(self._rope_factors) == 2:  # LongRoPE (phi3)
            if scaling_type not in (None, "none"):
                raise UnsupportedError(f"{self.path}: rope scaling {scaling_type!r} together with LongRoPE factors "
                                       "is not supported; re-convert the model")
            context = int(self.metadata(f"{arch}.context_length", 4096))
            original = int(self.metadata(f"{arch}.rope.scaling.original_context_length", context))
            attn = self.metadata(f"{arch}.rope.scaling.attn_factor")
            if attn is None:  # llama.cpp's converter writes it; the formula it uses otherwise
                attn = math.sqrt(1 + math.log(context / original) / math.log(original)) if context > original else 1.0
            rope_scaling = {**{key: tuple(float(f) for f in np.asarray(t.data, dtype=np.float32).reshape(-1))
                               for key, t in self._rope_factors.items()},
                            "type": "longrope", "original_max_position_embeddings": original,
                            "attention_factor": _short_float(attn)}
        elif self._rope_factors:
            raise ModelFormatError(f"{self.path}: has {', '.join(self._rope_factors)} but not both LongRoPE factor "
                                   "tensors (rope_factors_short / rope_factors_long); the file is incomplete; re-convert it")
        return rope_scaling

    def _extra(self) -> dict[str, Any]:
        """spec.extra: the format and path, llama-3's rope_freqs tensor, the chat template and file type."""
        extra: dict[str, Any] = {"format": "gguf", "path": self.path}
        if self._rope_freqs is not None:
            extra["rope_freqs"] = torch.from_numpy(np.array(self._rope_freqs.data, dtype=np.float32).reshape(-1))
        template = self.metadata("tokenizer.chat_template")
        if template is not None:
            extra["chat_template"] = template
        file_type = self.metadata("general.file_type")
        if file_type is not None:
            extra["file_type"] = int(file_type)
        return extra

    def _gemma_layers(self, arch: str, layers: int) -> tuple[bool, ...]:
        """Which layers slide: the file's sliding_window_pattern (a period, or one flag per layer), else llama.cpp's."""
        pattern = self.metadata(f"{arch}.attention.sliding_window_pattern", GEMMA_SWA_PATTERN[arch])
        if isinstance(pattern, list):
            if len(pattern) != layers:
                raise ModelFormatError(f"{self.path}: {arch}.attention.sliding_window_pattern has {len(pattern)} flags "
                                       f"for {layers} layers; the file is corrupt: re-convert it")
            return tuple(bool(p) for p in pattern)
        pattern = int(pattern)
        return tuple(pattern == 0 or i % pattern < pattern - 1 for i in range(layers))

    def _positive(self, key: str) -> float | None:
        """A float metadata value, or None where it is absent or 0 (llama.cpp's "off")."""
        value = self.metadata(key)
        return _short_float(value) if value else None

    @staticmethod
    def _gemma_scale(arch: str, layers: int, hidden: int, heads: int, head_dim: int) -> float:
        """llama.cpp's softmax scale for a Gemma GGUF (it reads no scale from the file for gemma)."""
        return (hidden // heads) ** -0.5 if layers == GEMMA_27B_LAYERS[arch] else head_dim**-0.5

    def _moe(self, arch: str) -> dict[str, Any]:
        """The spec's expert fields: {} without `{arch}.expert_count`; the sparse layers are those with a router."""
        experts = int(self.metadata(f"{arch}.expert_count", 0) or 0)
        if not experts:
            return {}
        layers = int(self._require(f"{arch}.block_count"))
        width = self.metadata(f"{arch}.expert_feed_forward_length") or self._require(f"{arch}.feed_forward_length")
        return {"num_experts": experts, "num_experts_per_tok": int(self._require(f"{arch}.expert_used_count")),
                "moe_intermediate_size": int(width),
                "norm_topk_prob": bool(self.metadata(f"{arch}.expert_weights_norm", True)),
                "moe_layers": tuple(i for i in range(layers) if f"layers.{i}.router" in self._tensors),
                "shared_expert_intermediate_size": int(self.metadata(f"{arch}.expert_shared_feed_forward_length", 0) or 0)}

    def _check_vocab(self) -> None:
        tokens = self.metadata("tokenizer.ggml.tokens")
        if isinstance(tokens, list) and len(tokens) > self.spec.vocab_size:
            raise ModelFormatError(
                f"{self.path}: the tokenizer has {len(tokens)} tokens (tokenizer.ggml.tokens) but the embedding "
                f"table token_embd.weight has {self.spec.vocab_size} rows; ids past it would have no embedding: "
                "the file is corrupt or mismatched; re-convert or re-download it"
            )

    def _check_tensors(self) -> None:
        for canon, t in self._tensors.items():
            qtype = t.tensor_type.name
            if qtype not in SUPPORTED_TYPES:
                raise UnsupportedError(
                    f"{self.path}: tensor {t.name!r} ({canon}) has weight type {qtype}, which lowgear cannot "
                    f"unpack: supported types are {', '.join(SUPPORTED_TYPES)}; use a GGUF quantized to one of those"
                )
        for i in range(self.spec.num_layers):
            required = (REQUIRED_LAYER_TENSORS + (("q_norm", "k_norm") if self.spec.qk_norm else ())
                        + (("post_attn_norm", "post_ffn_norm") if self.spec.gemma_block else ()) + self.spec.ffn_names(i))
            missing = [n for n in required
                       if f"layers.{i}.{n}" not in self._tensors and not fused_in(f"layers.{i}.{n}", self._tensors)]
            if missing:
                stored = ", ".join(f"blk.{i}.{_GGUF_PART[n]}.weight" for n in missing)
                raise ModelFormatError(
                    f"{self.path}: layer {i} has no {', '.join(missing)} tensor(s) ({stored}; {self.spec.arch} needs "
                    f"them and block_count says {self.spec.num_layers} layers); the file is incomplete or corrupt; "
                    "re-convert or re-download it"
                )
        if "norm" not in self._tensors:
            raise ModelFormatError(f"{self.path}: no output_norm.weight tensor; the file is incomplete; re-download it")

    # tensors ----------------------------------------------------------------------------------

    def _raw_names(self) -> list[str]:
        return list(self._tensors)

    def _info(self, name: str) -> TensorInfo:
        t = self._tensor(name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if name.endswith(".shared_expert_gate") and len(shape) == 1:  # llama.cpp's [hidden]: the [1, hidden] linear
            shape = (1, *shape)
        return TensorInfo(t.tensor_type.name, shape, int(t.n_bytes))

    def _raw_info(self, name: str) -> TensorInfo:
        """Type, logical shape and stored size of a tensor, without touching its data."""
        return self._info(name)

    def _tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {name!r}") from None

    def _raw_get(self, name: str) -> torch.Tensor | PackedTensor:
        """Zero-copy view: a float tensor [rows, cols] (or [n] for norms), or a PackedTensor."""
        t = self._tensor(name)
        qtype = t.tensor_type.name
        info = self._info(name)
        array = t.data
        if qtype == "BF16":
            # gguf-py exposes BF16 as raw bytes; reinterpret them in place.
            flat = torch.from_numpy(array.reshape(*info.shape[:-1], -1))
            return flat.view(torch.bfloat16).reshape(info.shape)
        if qtype in FLOAT_TYPES:
            return torch.from_numpy(array).reshape(info.shape)
        if is_quantized(qtype):
            rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
            data = torch.from_numpy(array).reshape(rows, -1)
            return PackedTensor(qtype, data, (rows, info.shape[-1]))
        raise UnsupportedError(f"{self.path}: tensor {name!r} has type {qtype}; supported: {', '.join(SUPPORTED_TYPES)}")
