"""config.json -> ModelSpec for a Hugging Face model folder, and its quantization_config checked.

formats/hf.py opens the folder and its weights; this module reads what config.json says of the model.
Both config styles are understood: transformers < 5 (`rope_theta`, `rope_scaling`, `torch_dtype`) and
transformers >= 5 (`rope_parameters`, `dtype`). What each architecture's fields mean (qwen2/qwen3
sliding windows, phi3's LongRoPE, Gemma's defaults and layer patterns, which MoE layers are sparse) is
told in formats/hf.py's docstring.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from ..errors import ModelFormatError, UnsupportedError
from .gptq import GPTQ_FORMATS, check_gptq_bits
from .spec import GEMMA_ARCHITECTURES, QK_NORM_ARCHITECTURES, SUPPORTED_ARCHITECTURES, ModelSpec


_ARCH_BY_CLASS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                  "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text",
                  "Gemma3ForConditionalGeneration": "gemma3", "Phi3ForCausalLM": "phi3",
                  "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe", "Qwen2MoeForCausalLM": "qwen2_moe"}
# transformers' Gemma2Config / Gemma3TextConfig defaults: Hub configs leave these out
GEMMA_DEFAULTS = {
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                   max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0, query_pre_attn_scalar=256,
                   sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   tie_word_embeddings=True, bos_token_id=2, eos_token_id=1),
    "gemma3": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                   max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                   rope_local_base_freq=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
                   sliding_window_pattern=6, final_logit_softcapping=None, attn_logit_softcapping=None,
                   tie_word_embeddings=True, bos_token_id=2, eos_token_id=1),
}


def _arch(cfg: dict, folder: str) -> str:
    arch = cfg.get("model_type")
    if arch is None:
        for cls in cfg.get("architectures") or ():
            arch = _ARCH_BY_CLASS.get(cls, arch)
    if arch in ("gemma3", "gemma3_text"):  # the text model alone, or an image-text model's language model
        arch = "gemma3"
    if arch not in SUPPORTED_ARCHITECTURES:
        shown = arch if arch is not None else (cfg.get("architectures") or "none given")
        raise UnsupportedError(
            f"{folder}: architecture {shown!r} is not supported: lowgear runs {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _rope(cfg: dict, folder: str) -> tuple[float, dict | None]:
    params = cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind in (None, "default"):
        return theta, None
    if kind in ("longrope", "su"):  # Phi-3's LongRoPE ("su" in older configs)
        # transformers prefers the top-level value phi3 configs carry over the one in the rope parameters
        original = int(cfg.get("original_max_position_embeddings") or scaling["original_max_position_embeddings"])
        # like transformers: the ratio of the contexts, unless a factor is given
        factor = float(scaling.get("factor") or _whole(cfg, "max_position_embeddings", folder) / original)
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        return theta, {"type": "longrope", "short_factor": tuple(float(f) for f in scaling["short_factor"]),
                       "long_factor": tuple(float(f) for f in scaling["long_factor"]),
                       "original_max_position_embeddings": original, "attention_factor": float(attention)}
    if kind == "linear":
        return theta, {"type": "linear", "factor": float(scaling["factor"])}
    if kind == "llama3":
        return theta, {
            "type": "llama3",
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
        }
    raise UnsupportedError(f"{folder}: rope scaling {kind!r} is not supported: lowgear handles linear, llama3 and "
                           "longrope (Phi-3)")


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _whole(cfg: dict, key: str, folder: str, default: Any = None) -> int:
    """config.json's `key` as an int, or a ModelFormatError naming the field."""
    value = cfg[key] if default is None else (cfg.get(key) or default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ModelFormatError(f"{folder}/config.json: {key} is {value!r}, not a whole number; the config is corrupt; re-download it")
    return int(value)


def _window(cfg: dict, arch: str, folder: str):
    """The sliding window config.json asks for, or None; qwen2/qwen3 use theirs only with use_sliding_window."""
    window = cfg.get("sliding_window")
    if arch in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not cfg.get("use_sliding_window", False):
        return None
    if arch in ("qwen3", "qwen3_moe") and window:
        # transformers: layers from max_window_layers on slide, unless layer_types says which
        layers = _whole(cfg, "num_hidden_layers", folder)
        first = cfg.get("max_window_layers", 28)
        types = cfg.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
        if any(t != "sliding_attention" for t in types):
            raise UnsupportedError(
                f"{folder}: config.json slides the attention window on some layers only (use_sliding_window with "
                "max_window_layers / layer_types); lowgear applies one window to every layer: set "
                "use_sliding_window to false, or max_window_layers to 0"
            )
    return window


def text_config(cfg: dict, folder: str) -> dict:
    """The language model's config: a gemma3 image-text model's `text_config` (its token ids kept from
    the outer config), with transformers' defaults under the fields a Gemma config leaves out."""
    arch = _arch(cfg, folder)
    if arch not in GEMMA_ARCHITECTURES:
        return cfg
    inner = cfg.get("text_config")
    if isinstance(inner, dict):
        outer = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "tie_word_embeddings", "_name_or_path") if k in cfg}
        cfg = {**outer, **inner}
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedError(f"{folder}: a Gemma with bidirectional attention (an embedding model) is not a "
                               "text generator: lowgear runs causal language models")
    cfg = {**GEMMA_DEFAULTS[arch], **{k: v for k, v in cfg.items() if v is not None or k.endswith("softcapping")}}
    act = cfg.get("hidden_activation") or cfg.get("hidden_act")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UnsupportedError(f"{folder}: hidden_activation {act!r} is not supported for {arch}: lowgear runs "
                               "Gemma's tanh-approximated GELU (gelu_pytorch_tanh)")
    return {**cfg, "model_type": arch}


def _gemma_layers(cfg: dict, arch: str, layers: int, folder: str) -> tuple[bool, ...]:
    """Which layers slide: config.json's layer_types, else Gemma's pattern (the last of every
    `pattern` layers is global; gemma2's pattern is 2)."""
    types = cfg.get("layer_types")
    if types is None:
        pattern = 2 if arch == "gemma2" else _whole(cfg, "sliding_window_pattern", folder)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown or len(types) != layers:
        raise ModelFormatError(f"{folder}/config.json: layer_types must list sliding_attention / full_attention once "
                               f"per layer ({layers}); it has {len(types)} entries{' and ' + ', '.join(unknown) if unknown else ''}")
    return tuple(t == "sliding_attention" for t in types)


def _gemma_rope(cfg: dict, folder: str) -> tuple[float, dict | None, float]:
    """(global theta, global scaling, local theta) of a gemma3 config, either style."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:  # transformers 5: one rope_parameters per layer type
        full, local = params["full_attention"] or {}, params.get("sliding_attention") or {}
    else:
        full = {"rope_theta": params.get("rope_theta", cfg["rope_theta"]), **(cfg.get("rope_scaling") or {})}
        local = {"rope_theta": cfg["rope_local_base_freq"]}
    theta, scaling = _rope({"rope_parameters": full}, folder)
    local_theta, local_scaling = _rope({"rope_parameters": local, "rope_theta": GEMMA_DEFAULTS["gemma3"]["rope_local_base_freq"]},
                                       folder)
    if local_scaling is not None:
        raise UnsupportedError(f"{folder}: rope scaling on gemma3's sliding layers is not supported (only on its "
                               "global layers, as Gemma 3 is trained)")
    return theta, scaling, local_theta


def _softcap(cfg: dict, key: str) -> float | None:
    value = cfg.get(key)
    return float(value) if value else None


def _moe(cfg: dict, arch: str, folder: str) -> dict:
    """The ModelSpec fields of a mixture-of-experts config (transformers' MixtralConfig / Qwen3MoeConfig); {} for dense."""
    layers = _whole(cfg, "num_hidden_layers", folder)
    if arch == "mixtral":  # every layer sparse; experts as wide as intermediate_size; top-k always renormalised
        return {"num_experts": _whole(cfg, "num_local_experts", folder), "num_experts_per_tok": _whole(cfg, "num_experts_per_tok", folder),
                "moe_intermediate_size": _whole(cfg, "intermediate_size", folder), "norm_topk_prob": True,
                "moe_layers": tuple(range(layers))}
    if arch in ("qwen2_moe", "qwen3_moe"):  # transformers: sparse unless in mlp_only_layers, on every decoder_sparse_step-th layer
        experts = _whole(cfg, "num_experts" if "num_experts" in cfg else "num_local_experts", folder)
        step = _whole(cfg, "decoder_sparse_step", folder, 1)
        dense = {int(i) for i in cfg.get("mlp_only_layers") or ()}
        return {"num_experts": experts, "num_experts_per_tok": _whole(cfg, "num_experts_per_tok", folder),
                "moe_intermediate_size": _whole(cfg, "moe_intermediate_size", folder),
                "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
                "moe_layers": tuple(i for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0),
                "shared_expert_intermediate_size": _whole(cfg, "shared_expert_intermediate_size", folder) if arch == "qwen2_moe" else 0}
    return {}


def spec_from_config(cfg: dict, folder: str, has_lm_head: bool) -> ModelSpec:
    try:
        return _spec_from_config(cfg, folder, has_lm_head)
    except (TypeError, ValueError, AttributeError, OverflowError, ZeroDivisionError) as e:
        raise ModelFormatError(
            f"{folder}/config.json has a malformed value ({type(e).__name__}: {e}); the config is corrupt; re-download it"
        ) from None


def _spec_from_config(cfg: dict, folder: str, has_lm_head: bool) -> ModelSpec:
    cfg = text_config(cfg, folder)
    arch = _arch(cfg, folder)
    try:
        hidden = _whole(cfg, "hidden_size", folder)
        heads = _whole(cfg, "num_attention_heads", folder)
        gemma = arch in GEMMA_ARCHITECTURES
        local_theta = None
        if arch == "gemma3":
            theta, scaling, local_theta = _gemma_rope(cfg, folder)
        else:
            theta, scaling = _rope(cfg, folder)
        window = _window(cfg, arch, folder)
        layers = _whole(cfg, "num_hidden_layers", folder)
        bos = _ids(cfg.get("bos_token_id"))
        head_dim = _whole(cfg, "head_dim", folder, hidden // heads if heads else 0)
        partial = float((cfg.get("rope_parameters") or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
        return ModelSpec(
            arch=arch,
            vocab_size=_whole(cfg, "vocab_size", folder),
            hidden_size=hidden,
            intermediate_size=_whole(cfg, "intermediate_size", folder),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=_whole(cfg, "num_key_value_heads", folder, heads),
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            rope_style="neox",
            max_position_embeddings=_whole(cfg, "max_position_embeddings", folder, 4096),
            rotary_dim=int(head_dim * partial) if partial != 1.0 else None,  # as transformers rounds it
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)) or not has_lm_head,
            attention_bias=arch in ("qwen2", "qwen2_moe") or bool(cfg.get("attention_bias", False)),
            sliding_window=int(window) if window else None,
            qk_norm=arch in QK_NORM_ARCHITECTURES,
            sliding_layers=_gemma_layers(cfg, arch, layers, folder) if gemma else None,
            rope_local_theta=local_theta,
            attn_scale=float(cfg["query_pre_attn_scalar"]) ** -0.5 if gemma else None,
            attn_softcap=_softcap(cfg, "attn_logit_softcapping") if gemma else None,
            final_softcap=_softcap(cfg, "final_logit_softcapping") if gemma else None,
            gemma_block=gemma,
            **_moe(cfg, arch, folder),
            bos_token_id=bos[0] if bos else None,
            eos_token_ids=_ids(cfg.get("eos_token_id")),
            name=str(cfg.get("_name_or_path", os.path.basename(os.path.normpath(folder)))),
            extra={"format": "hf", "path": folder, "torch_dtype": cfg.get("dtype", cfg.get("torch_dtype"))},
        )
    except KeyError as e:
        raise ModelFormatError(f"{folder}/config.json has no {e.args[0]!r}; the config is incomplete; re-download it") from None


def _quantization_config(cfg: dict, folder: str) -> dict | None:
    """config.json's quantization_config (or AutoGPTQ's quantize_config.json), with its method checked."""
    q = cfg.get("quantization_config")
    side = os.path.join(folder, "quantize_config.json")
    if q is None and os.path.isfile(side):  # AutoGPTQ's older layout: a separate file, GPTQ implied
        with open(side) as f:
            q = {"quant_method": "gptq", **json.load(f)}
    if q is None:
        return None
    method = str(q.get("quant_method", "gptq")).lower()
    if method not in ("gptq", "exl2", "awq"):
        raise UnsupportedError(
            f"{folder}: quantization method {method!r} is not supported: lowgear reads GPTQ (2/3/4/8-bit), "
            "AWQ (4-bit gemm), EXL2 and unquantized (F32/F16/BF16) Hugging Face folders, and GGUF files"
        )
    return {**q, "quant_method": method}


def gptq_config(cfg: dict, folder: str) -> dict | None:
    """The GPTQ facts {bits, group_size, sym, zero_offset} of a GPTQ folder; None for any other folder."""
    q = _quantization_config(cfg, folder)
    if q is None or q["quant_method"] != "gptq":
        return None
    fmt = str(q.get("checkpoint_format", "gptq")).lower()
    if fmt not in GPTQ_FORMATS:
        raise UnsupportedError(
            f"{folder}: GPTQ checkpoint_format {fmt!r} is not supported: lowgear reads {', '.join(GPTQ_FORMATS)}"
        )
    try:
        bits, group_size = int(q["bits"]), int(q.get("group_size", -1))
    except (KeyError, TypeError, ValueError):
        raise ModelFormatError(f"{folder}: quantization_config has no valid 'bits'; the config is incomplete") from None
    check_gptq_bits(bits, folder)
    return {"bits": bits, "group_size": group_size, "sym": bool(q.get("sym", True)), "zero_offset": GPTQ_FORMATS[fmt]}
