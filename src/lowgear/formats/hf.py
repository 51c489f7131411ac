"""Reading a Hugging Face model folder: config.json into a ModelSpec (formats/hf_config.py), safetensors under canonical names.

The folder holds config.json and either one `*.safetensors` file or shards listed by
`model.safetensors.index.json`. Files are opened with safetensors' `safe_open`, which reads the
header only; each tensor is read when `get` asks for it, so opening a 70B folder costs nothing.

Both config styles are understood: transformers < 5 (`rope_theta`, `rope_scaling`, `torch_dtype`)
and transformers >= 5 (`rope_parameters`, `dtype`). HF checkpoints keep q/k in the "neox" (rotate
halves) layout. qwen2 always has q/k/v biases; its sliding window only applies with
`use_sliding_window`. qwen3 has q/k biases only with `attention_bias`, a per-head RMSNorm on q and k
(`self_attn.q_norm` / `k_norm`, [head_dim]) and its own `head_dim`; its sliding window, when used,
must cover every layer (`layer_types`). phi3 stores q|k|v as
`self_attn.qkv_proj` and gate|up as `mlp.gate_up_proj`; they are read as `layers.{i}.qkv` /
`gate_up` and served as their parts (formats/fused.py). Its rope may be LongRoPE ("longrope", or
"su" in older configs: short_factor / long_factor, model/rope.py) over the first
`partial_rotary_factor` of each head (`spec.rotary_dim`).

gemma2 and gemma3 (`gemma3_text`, or `gemma3` whose `text_config` describes the language model: the
vision tower's and projector's tensors are left unread, text only) take the fields a Hub config.json
leaves out from transformers' defaults for them (GEMMA_DEFAULTS). Their norms store (multiplier - 1):
`get` hands each out as 1 + w in float32. Which layers slide comes from `layer_types`, else the
pattern (gemma2 every other layer from the first; gemma3 `sliding_window_pattern`, 6: five of six).
gemma3's sliding layers rotate with `rope_local_base_freq` (transformers 5: `rope_parameters
["sliding_attention"]`), unscaled; its global layers with `rope_theta` and any `rope_scaling`.

Mixture-of-experts folders (mixtral, qwen2_moe, qwen3_moe) store each expert's linears apart
(`block_sparse_moe.experts.E.w1/w3/w2`, `mlp.experts.E.gate_proj/up_proj/down_proj`); they are handed
out stacked under `layers.N.gate_exps / up_exps / down_exps` (a float [E, N, K] tensor, or a tuple of
the E quantized weights), with the router (`block_sparse_moe.gate`, `mlp.gate`) as `layers.N.router`
and qwen2_moe's shared expert as `shared_gate / shared_up / shared_down / shared_expert_gate`. Which
layers are sparse follows transformers: all for mixtral; for the qwen MoEs those not in
`mlp_only_layers` on every `decoder_sparse_step`-th layer.

GPTQ folders (`quantization_config.quant_method` "gptq" in config.json, or an AutoGPTQ
`quantize_config.json`) store each linear as `<prefix>.qweight/.qzeros/.scales[/.g_idx]`; `get`
hands those back as one `GPTQWeight` under the linear's canonical name.

AWQ folders (`quant_method` "awq", AutoAWQ's "gemm" layout, 4-bit with zero points) store each
linear as `<prefix>.qweight/.qzeros/.scales` packed along the output dim; `get` repacks them into the
equal `GPTQWeight` (formats/awq.py), so they run as GPTQ layers. Other AWQ versions are refused.

EXL2 folders (ExLlamaV2's converter) are recognised the way ExLlamaV2 recognises them, by tensor
names: a linear stored as `<prefix>.q_weight/.q_scale/.q_scale_max/.q_groups/.q_invperm` comes back
as one `EXL2Weight` (see formats/exl2.py for the format); `quantization_config.quant_method` "exl2"
is accepted but not required (older folders lack it). Embeddings and norms stay fp16 tensors. ExLlamaV2
pads a linear's outputs to a multiple of 32; the padding columns are dropped here using config.json's
shapes. Other quant methods are refused up front with an UnsupportedError.

`quantization()` sums a folder up for `doctor` from tensor headers alone (for EXL2: the average bits
per weight over the decoder layers' linears, the per-linear range and the head's).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
from typing import Any

import torch

from ..errors import ModelFormatError, UnsupportedError
from .awq import awq_config, awq_to_gptq
from .exl2 import EXL2Weight, exl2_bits_per_weight, exl2_qtype
from .fused import FusedParts, fused_in
from .gptq import GPTQWeight, gptq_qtype
from .hf_config import _arch, _quantization_config, gptq_config, spec_from_config
from .spec import GEMMA_ARCHITECTURES, TensorInfo
from .validate import check_spec, check_tensors

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# one expert's linear of a mixture-of-experts layer: mixtral's block_sparse_moe.experts.E.w1/w3/w2, qwen3_moe's
# mlp.experts.E.gate_proj/up_proj/down_proj; the model sees them stacked (layers.N.gate_exps, ...: _EXPERT_STACK)
_EXPERT_RE = re.compile(r"^(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_PART = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_EXPERT_STACK = re.compile(r"^(layers\.\d+)\.experts\.(\d+)\.(gate|up|down)$")
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "q",
    "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o",
    "self_attn.qkv_proj.weight": "qkv",  # phi3: q|k|v rows in one tensor (formats/fused.py)
    "self_attn.q_proj.bias": "q_bias",
    "self_attn.k_proj.bias": "k_bias",
    "self_attn.v_proj.bias": "v_bias",
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
    "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "gate",
    "mlp.up_proj.weight": "up",
    "mlp.down_proj.weight": "down",
    "mlp.gate_up_proj.weight": "gate_up",  # phi3: gate|up rows in one tensor
    "block_sparse_moe.gate.weight": "router",  # mixtral
    "mlp.gate.weight": "router",  # qwen2_moe, qwen3_moe
    "mlp.shared_expert.gate_proj.weight": "shared_gate",  # qwen2_moe
    "mlp.shared_expert.up_proj.weight": "shared_up",
    "mlp.shared_expert.down_proj.weight": "shared_down",
    "mlp.shared_expert_gate.weight": "shared_expert_gate",
}
# Gemma's layer norms: input (attn_norm), post-attention, pre- and post-feedforward
_GEMMA_LAYER_NAMES = {**_LAYER_NAMES, "post_attention_layernorm.weight": "post_attn_norm",
                      "pre_feedforward_layernorm.weight": "ffn_norm",
                      "post_feedforward_layernorm.weight": "post_ffn_norm"}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}
# a gemma3 image-text checkpoint's language model, under the Hub's names and transformers 5's
_TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
log = logging.getLogger(__name__)
_ST_DTYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16"}
_ST_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1}


def canonical_name(hf_name: str, arch: str | None = None) -> str | None:
    """HF tensor name -> lowgear canonical name, or None for tensors the model does not use."""
    if arch == "gemma3":
        for prefix, short in _TEXT_PREFIXES:
            if hf_name.startswith(prefix):
                hf_name = short + hf_name[len(prefix):]
                break
    m = _LAYER_RE.match(hf_name)
    if m:
        short = (_GEMMA_LAYER_NAMES if arch in GEMMA_ARCHITECTURES else _LAYER_NAMES).get(m.group(2))
        if short is None:
            expert = _EXPERT_RE.match(m.group(2))
            return None if expert is None else f"layers.{m.group(1)}.experts.{expert.group(1)}.{_EXPERT_PART[expert.group(2)]}"
        return f"layers.{m.group(1)}.{short}"
    return _GLOBAL_NAMES.get(hf_name)


_GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")
_EXL2_PARTS = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm", "q_perm")


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [p for p in files if not os.path.isfile(os.path.join(folder, p))]
        if missing:
            raise ModelFormatError(
                f"{folder}: model.safetensors.index.json lists {', '.join(missing)}, which are missing; "
                "download every shard"
            )
        return [os.path.join(folder, p) for p in files]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ModelFormatError(
            f"no *.safetensors in {folder}: lowgear reads safetensors weights (not .bin/.pt); download them "
            "or convert the checkpoint"
        )
    return files


class HFSource(FusedParts):
    """A WeightSource over a Hugging Face model folder."""

    _copy_parts = True  # safetensors reads copies: a q/k/v part must not keep the whole qkv alive

    def __init__(self, folder: str | os.PathLike):
        self.path = os.fspath(folder)
        arch = self._read_config()
        self._norm_plus_one = arch in GEMMA_ARCHITECTURES  # Gemma stores norms as (multiplier - 1)
        other_towers = self._index_files(arch)
        if other_towers:
            log.info("%s: an image-text model; lowgear runs its language model only and leaves the %d vision tower "
                     "and projector tensors unread", self.path, other_towers)
        self.spec = spec_from_config(self.config, self.path, "lm_head" in self._where)
        if other_towers:
            self.spec.extra["text_only"] = f"{other_towers} vision tower / projector tensors not loaded (text only)"
        self._stacks = self._expert_stacks()
        self._check_complete()
        self._split_fused(self.path, self._stored_name)
        check_tensors(self, self.path, self._stored_name)

    def _read_config(self) -> str:
        """config.json into self.config with its quantization (gptq / awq / exl2_config); the architecture."""
        config_path = os.path.join(self.path, "config.json")
        if not os.path.isfile(config_path):
            raise ModelFormatError(f"{self.path} has no config.json: give a Hugging Face model folder or a .gguf file")
        try:
            with open(config_path) as f:
                self.config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ModelFormatError(f"{config_path} is not valid JSON ({e}); re-download it") from None
        if not isinstance(self.config, dict):
            raise ModelFormatError(f"{config_path} holds a JSON {type(self.config).__name__}, not an object; re-download it")
        try:
            _arch(self.config, self.path)  # unsupported architectures fail before any weight is opened
            self.gptq = gptq_config(self.config, self.path)
            q = _quantization_config(self.config, self.path)
        except (TypeError, ValueError, AttributeError) as e:
            raise ModelFormatError(f"{config_path} has a malformed value ({type(e).__name__}: {e}); re-download it") from None
        self.exl2_config = q if q is not None and q["quant_method"] == "exl2" else None
        self.awq = awq_config(q, self.path) if q is not None and q["quant_method"] == "awq" else None
        return _arch(self.config, self.path)

    def _index_files(self, arch: str) -> int:
        """Open every safetensors file and map canonical names to its tensors (float, GPTQ/AWQ or EXL2);
        the number of vision tower / projector tensors left unread."""
        from safetensors import safe_open

        other_towers = 0
        self._files: dict[str, Any] = {}
        self._where: dict[str, tuple[str, str]] = {}  # canonical -> (file, hf name)
        self._file_of: dict[str, str] = {}  # hf name -> file (GPTQ parts may sit in different shards)
        self._gptq_prefix: dict[str, str] = {}  # canonical -> hf prefix of a GPTQ linear
        self._exl2_prefix: dict[str, str] = {}  # canonical -> hf prefix of an EXL2 linear
        for path in _weight_files(self.path):
            try:
                handle = safe_open(path, framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise ModelFormatError(f"{path} is not a readable safetensors file ({e}); re-download it") from e
            self._files[path] = handle
            for hf_name in handle.keys():
                self._file_of[hf_name] = path
                canon = canonical_name(hf_name, arch)
                if canon is None and hf_name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                                                         "model.multi_modal_projector.")):
                    other_towers += 1
                if canon is not None:
                    if canon not in self._exl2_prefix:  # an EXL2 linear wins over a stray float copy
                        self._where[canon] = (path, hf_name)
                elif hf_name.endswith(".q_weight"):  # EXL2, recognised by name as ExLlamaV2 does
                    prefix = hf_name[: -len(".q_weight")]
                    canon = canonical_name(prefix + ".weight", arch)
                    if canon is not None:
                        self._where[canon] = (path, hf_name)
                        self._exl2_prefix[canon] = prefix
                elif (self.gptq is not None or self.awq is not None) and hf_name.endswith(".qweight"):
                    prefix = hf_name[: -len(".qweight")]
                    canon = canonical_name(prefix + ".weight", arch)
                    if canon is not None:
                        self._where[canon] = (path, hf_name)
                        self._gptq_prefix[canon] = prefix
        return other_towers

    def _check_complete(self) -> None:
        """Every weight the spec needs is there, the spec is sane, and no EXL2 linear is stored fused."""
        missing = [
            f"layers.{i}.{n}"
            for i in range(self.spec.num_layers)
            for n in ("attn_norm", "q", "k", "v", "o", "ffn_norm", *self.spec.ffn_names(i))
            + (("post_attn_norm", "post_ffn_norm") if self.spec.gemma_block else ())
            if f"layers.{i}.{n}" not in self._where and f"layers.{i}.{n}" not in self._stacks
            and not fused_in(f"layers.{i}.{n}", self._where)
        ]
        missing += [n for n in ("embed", "norm") if n not in self._where]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ModelFormatError(f"{self.path}: weights are missing ({shown}); download every safetensors shard")
        check_spec(self.spec, f"{self.path}/config.json")
        fused_exl2 = [self._exl2_prefix[n] for n in self._exl2_prefix if n.rpartition(".")[2] in ("qkv", "gate_up")]
        if fused_exl2:
            raise UnsupportedError(
                f"{self.path}: EXL2 linears stored fused ({fused_exl2[0]}, phi3's qkv_proj / gate_up_proj) are not "
                "supported: use the model as GPTQ, AWQ, GGUF or unquantized"
            )

    def _expert_stacks(self) -> dict[str, list[str]]:
        """layers.N.gate_exps / up_exps / down_exps -> the canonical names of experts 0..E-1 (each must be there)."""
        found: dict[str, dict[int, str]] = {}
        for canon in self._where:
            m = _EXPERT_STACK.match(canon)
            if m:
                found.setdefault(f"{m.group(1)}.{m.group(3)}_exps", {})[int(m.group(2))] = canon
        stacks = {}
        for name, experts in found.items():
            want = self.spec.num_experts
            if sorted(experts) != list(range(want)):
                absent = [e for e in range(want) if e not in experts][:4]
                raise ModelFormatError(
                    f"{self.path}: {name} needs experts 0..{want - 1} (num_experts in config.json) but the folder holds "
                    f"{len(experts)} of them (missing {absent or 'none'}, extra {sorted(set(experts) - set(range(want)))[:4]}); "
                    "download every safetensors shard, or the config does not belong to the weights"
                )
            stacks[name] = [experts[e] for e in range(want)]
        return stacks

    def _stored_name(self, canon: str) -> str:
        if canon in self._stacks:  # the first expert's name stands for the stack
            return self._where[self._stacks[canon][0]][1]
        return self._where[self._parts[canon][0] if canon in self._parts else canon][1]

    def _raw_names(self) -> list[str]:
        return [n for n in self._where if not _EXPERT_STACK.match(n)] + list(self._stacks)

    def _slice(self, name: str):
        try:
            path, hf_name = self._where[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {name!r}") from None
        return self._files[path].get_slice(hf_name)

    def _gptq_part(self, name: str, part: str):
        hf_name = f"{self._gptq_prefix[name]}.{part}"
        path = self._file_of.get(hf_name)
        if path is None:
            if part == "g_idx":
                return None
            raise ModelFormatError(f"{self.path}: GPTQ tensor {hf_name} is missing; download every safetensors shard")
        return self._files[path].get_slice(hf_name)

    def _gptq_info(self, name: str) -> TensorInfo:
        g = self.gptq
        rows, cols = (int(d) for d in self._slice(name).get_shape())
        nbytes = 0
        for part in _GPTQ_PARTS:
            sl = self._gptq_part(name, part)
            if sl is not None:
                nbytes += math.prod(sl.get_shape()) * (2 if sl.get_dtype() in ("F16", "BF16") else 4)
        if self.awq is not None:  # AWQ: qweight [in, out / 8]; held repacked as GPTQ, of the same bytes
            return TensorInfo(gptq_qtype(4, self.awq["group_size"], "AWQ"), (cols * 8, rows), nbytes)
        return TensorInfo(gptq_qtype(g["bits"], g["group_size"]), (cols, rows * 32 // g["bits"]), nbytes)

    def _exl2_part(self, name: str, part: str):
        hf_name = f"{self._exl2_prefix[name]}.{part}"
        path = self._file_of.get(hf_name)
        if path is None:
            if part in ("q_invperm", "q_perm"):
                return None
            raise ModelFormatError(f"{self.path}: EXL2 tensor {hf_name} is missing; download every safetensors shard")
        return self._files[path].get_slice(hf_name)

    def _exl2_slices(self, name: str) -> dict:
        parts = {p: self._exl2_part(name, p) for p in _EXL2_PARTS}
        if parts["q_invperm"] is None and parts["q_perm"] is None:
            raise ModelFormatError(
                f"{self.path}: EXL2 tensor {self._exl2_prefix[name]}.q_invperm is missing (nor is there a q_perm); "
                "download every safetensors shard"
            )
        return parts

    def _expected_out(self, name: str, width: int) -> int:
        """The output features config.json implies for linear `name`, given q_weight's (padded) width."""
        s = self.spec
        short = name.rsplit(".", 1)[-1]
        expected = {"q": s.num_heads * s.head_dim, "k": s.num_kv_heads * s.head_dim, "v": s.num_kv_heads * s.head_dim,
                    "o": s.hidden_size, "down": s.hidden_size, "gate": s.intermediate_size,
                    "up": s.intermediate_size, "lm_head": s.vocab_size}.get(short, width)
        if not expected <= width < expected + 32:
            raise ModelFormatError(
                f"{self.path}: EXL2 tensor {self._exl2_prefix[name]}.q_weight has {width} output columns, but "
                f"config.json implies {expected}; the folder's config.json does not belong to its weights"
            )
        return expected

    def _exl2_info(self, name: str) -> TensorInfo:
        parts = self._exl2_slices(name)
        shapes = {p: [int(d) for d in sl.get_shape()] for p, sl in parts.items() if sl is not None}
        perm = "q_invperm" if parts["q_invperm"] is not None else "q_perm"
        (packed_rows, width), groups, n_in = shapes["q_weight"], math.prod(shapes["q_groups"]) // 2, shapes[perm][0]
        nbytes = sum(math.prod(shapes[p]) * _ST_BYTES.get(parts[p].get_dtype(), 4)
                     for p in ("q_weight", "q_scale", "q_scale_max", "q_groups", perm))
        bpw = exl2_bits_per_weight(packed_rows, width, groups, n_in)
        return TensorInfo(exl2_qtype(bpw), (self._expected_out(name, width), n_in), nbytes)

    def exl2_bits_per_weight(self, name: str) -> float:
        """ExLlamaV2's bits per weight of EXL2 linear `name`, from its tensor headers."""
        parts = self._exl2_slices(name)
        perm = parts["q_invperm"] if parts["q_invperm"] is not None else parts["q_perm"]
        packed_rows, width = (int(d) for d in parts["q_weight"].get_shape())
        groups = math.prod(parts["q_groups"].get_shape()) // 2
        return exl2_bits_per_weight(packed_rows, width, groups, int(perm.get_shape()[0]))

    def quantization(self) -> dict:
        """The folder's quantization in brief, from headers only: {"method": "EXL2" | "GPTQ" | None, ...}."""
        if self._exl2_prefix:
            per = {n: (self.exl2_bits_per_weight(n), math.prod(self.info(n).shape)) for n in self._exl2_prefix}
            layers = {n: v for n, v in per.items() if n.startswith("layers.")}
            numel = sum(m for _, m in layers.values())
            lo = min(layers, key=lambda n: layers[n][0]) if layers else None
            hi = max(layers, key=lambda n: layers[n][0]) if layers else None
            q = self.exl2_config or {}
            return {
                "method": "EXL2",
                "bits_per_weight": sum(b * m for b, m in layers.values()) / numel if numel else None,
                "min": [lo, layers[lo][0]] if lo else None,
                "max": [hi, layers[hi][0]] if hi else None,
                "head_bits_per_weight": per["lm_head"][0] if "lm_head" in per else None,
                "quantized_linears": len(per),
                "float_linears": sum(1 for n in self._where if _is_linear(n) and n not in per),
                "converter": {k: q.get(k) for k in ("version", "bits", "head_bits") if k in q},
            }
        if self.awq is not None:
            return {"method": "AWQ", "bits": self.awq["bits"], "group_size": self.awq["group_size"], "version": "gemm",
                    "quantized_linears": len(self._gptq_prefix)}
        if self.gptq is not None:
            fmt = "gptq" if self.gptq["zero_offset"] else "gptq_v2"
            return {"method": "GPTQ", "bits": self.gptq["bits"], "group_size": self.gptq["group_size"],
                    "sym": self.gptq["sym"], "checkpoint_format": fmt, "quantized_linears": len(self._gptq_prefix)}
        return {"method": None}

    def _raw_info(self, name: str) -> TensorInfo:
        if name in self._stacks:  # every expert's linear, stacked: one type and shape, with a leading [experts]
            infos = [self._raw_info(n) for n in self._stacks[name]]
            kinds = {(i.qtype, i.shape) for i in infos}
            if len(kinds) > 1:
                raise ModelFormatError(f"{self.path}: the experts of {name} differ in type or shape ({sorted(kinds)[:3]}); "
                                       "lowgear stacks them as one tensor; re-convert the model")
            return TensorInfo(infos[0].qtype, (len(infos), *infos[0].shape), sum(i.nbytes for i in infos))
        if name in self._gptq_prefix:
            return self._gptq_info(name)
        if name in self._exl2_prefix:
            return self._exl2_info(name)
        sl = self._slice(name)
        dtype = sl.get_dtype()
        qtype = _ST_DTYPES.get(dtype)
        if qtype is None:
            raise UnsupportedError(f"{self.path}: tensor {name!r} is stored as {dtype}; lowgear reads F32, F16 and BF16 safetensors")
        shape = tuple(int(d) for d in sl.get_shape())
        linear = name[: -len("_bias")] if name.endswith("_bias") else None
        if linear in self._exl2_prefix and len(shape) == 1:  # ExLlamaV2 pads a bias with its linear
            shape = (self._expected_out(linear, shape[0]),)
        n = 1
        for d in shape:
            n *= d
        return TensorInfo(qtype, shape, n * (4 if qtype == "F32" else 2))

    def _raw_get(self, name: str) -> torch.Tensor | GPTQWeight | EXL2Weight | tuple:
        """A tensor or quantized weight; stacked experts come as one float [E, N, K] tensor, or a tuple of
        each expert's quantized weight (the model stacks those)."""
        if name in self._stacks:
            self._raw_info(name)  # one type and shape for all
            parts = [self._raw_get(n) for n in self._stacks[name]]
            return torch.stack(parts) if isinstance(parts[0], torch.Tensor) else tuple(parts)
        if name in self._exl2_prefix:
            tensors = {p: (sl[:] if sl is not None else None) for p, sl in self._exl2_slices(name).items()}
            width = int(tensors["q_weight"].shape[1]) if tensors["q_weight"].dim() == 2 else 0
            out = self._expected_out(name, width)
            return EXL2Weight(**tensors, out_features=out).validate(self._exl2_prefix[name])
        if name in self._gptq_prefix:
            parts = {p: self._gptq_part(name, p) for p in _GPTQ_PARTS}
            tensors = {p: (sl[:] if sl is not None else None) for p, sl in parts.items()}  # reads each part
            if self.awq is not None:
                return awq_to_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], self.awq["group_size"],
                                   self._gptq_prefix[name])
            return GPTQWeight(**tensors, **self.gptq).validate(self._gptq_prefix[name])
        self._raw_info(name)  # dtype check
        path, hf_name = self._where[name]
        t = self._files[path].get_tensor(hf_name)
        linear = name[: -len("_bias")] if name.endswith("_bias") else None
        if linear in self._exl2_prefix and t.dim() == 1:  # ExLlamaV2 pads a bias with its linear
            t = t[: self._expected_out(linear, t.shape[0])]
        if self._norm_plus_one and name.endswith("norm"):
            t = t.float() + 1.0  # Gemma's RMSNorm scales by 1 + w, computed in float32 as transformers does
        return t


def _is_linear(name: str) -> bool:
    return name == "lm_head" or name.rsplit(".", 1)[-1] in ("q", "k", "v", "o", "gate", "up", "down")
