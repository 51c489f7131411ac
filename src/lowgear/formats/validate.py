"""Checks a reader runs as it opens a model: the spec's numbers, then every tensor's shape and type.

A file whose tensors do not fit its own header would otherwise load and fail on the first step
(a RuntimeError from a matmul, an IndexError from the embedding); here it fails at open with a
`ModelFormatError` naming the tensor, the shape the architecture needs and the shape it has.
"""

from __future__ import annotations

import math

from ..errors import ModelFormatError
from .blocks import FLOAT_TYPES, QUANT_FORMATS
from .spec import ModelSpec

_NORMS = ("attn_norm", "ffn_norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")


def check_spec(spec: ModelSpec, where: str) -> None:
    """The header's sizes are positive, consistent and finite."""

    def bad(field: str, value, need: str) -> ModelFormatError:
        return ModelFormatError(f"{where}: {field} is {value!r}, but {need}; the model header is corrupt; re-download or re-convert it")

    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "max_position_embeddings"):
        value = getattr(spec, field)
        if not isinstance(value, int) or not 1 <= value < 2**31:
            raise bad(field, value, "it must be a positive whole number below 2**31")
    if spec.sliding_window is not None and not (isinstance(spec.sliding_window, int) and 1 <= spec.sliding_window < 2**31):
        raise bad("sliding_window", spec.sliding_window, "it must be a positive whole number below 2**31 or absent")
    if spec.sliding_layers is not None and len(spec.sliding_layers) != spec.num_layers:
        raise bad("layer_types", len(spec.sliding_layers), f"it must name one type per layer ({spec.num_layers})")
    if spec.num_heads % spec.num_kv_heads:
        raise bad("num_kv_heads", spec.num_kv_heads, f"it must divide num_heads ({spec.num_heads})")
    if spec.head_dim % 2:
        raise bad("head_dim", spec.head_dim, "RoPE needs an even head size")
    if spec.moe_layers:
        for field in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            value = getattr(spec, field)
            if not isinstance(value, int) or not 1 <= value < 2**31:
                raise bad(field, value, "a mixture-of-experts model needs a positive whole number below 2**31")
        if spec.num_experts_per_tok > spec.num_experts:
            raise bad("num_experts_per_tok", spec.num_experts_per_tok, f"a token cannot use more than the {spec.num_experts} experts")
    for field in ("rms_norm_eps", "rope_theta", "rope_local_theta", "attn_scale", "attn_softcap", "final_softcap"):
        value = getattr(spec, field)
        if value is None and field not in ("rms_norm_eps", "rope_theta"):
            continue
        if not math.isfinite(value) or value <= 0:
            raise bad(field, value, "it must be a positive finite number")
    rot = spec.rotary_dim if spec.rotary_dim is not None else spec.head_dim
    if not (isinstance(rot, int) and 2 <= rot <= spec.head_dim and rot % 2 == 0):
        raise bad("rotary_dim", rot, f"RoPE needs an even number of dims, at most head_dim ({spec.head_dim})")
    scaling = spec.rope_scaling or {}
    if scaling.get("type") == "longrope":
        for key in ("short_factor", "long_factor"):
            factors = scaling[key]
            if len(factors) != rot // 2 or not all(math.isfinite(f) and f > 0 for f in factors):
                raise bad(f"rope {key}", f"{len(factors)} values", f"LongRoPE needs {rot // 2} positive factors (rotary dims / 2)")
        if not 0 < scaling["original_max_position_embeddings"] < 2**31 or not math.isfinite(scaling["attention_factor"]):
            raise bad("rope original_max_position_embeddings", scaling["original_max_position_embeddings"],
                      "it must be a positive whole number below 2**31 (and the attention factor finite)")
    if spec.rope_scaling and not (math.isfinite(spec.rope_scaling.get("factor", 1.0)) and spec.rope_scaling.get("factor", 1.0) > 0):
        raise bad("rope scaling factor", spec.rope_scaling.get("factor"), "it must be a positive finite number")
    for name, ids in (("bos_token_id", (spec.bos_token_id,) if spec.bos_token_id is not None else ()), ("eos_token_id", spec.eos_token_ids)):
        for i in ids:
            if not 0 <= i < spec.vocab_size:
                raise bad(name, i, f"the vocabulary has {spec.vocab_size} tokens (ids 0..{spec.vocab_size - 1})")


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Canonical name -> the shape the architecture needs ([out, in] for linears)."""
    h, q_out, kv_out = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    inter = spec.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed": (spec.vocab_size, h), "norm": (h,), "lm_head": (spec.vocab_size, h)}
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attn_norm": (h,), p + "ffn_norm": (h,),
            p + "q": (q_out, h), p + "k": (kv_out, h), p + "v": (kv_out, h), p + "o": (h, q_out),
            p + "q_bias": (q_out,), p + "k_bias": (kv_out,), p + "v_bias": (kv_out,),
        })
        if spec.is_moe_layer(i):
            e, mi = spec.num_experts, spec.moe_intermediate_size
            shapes.update({p + "router": (e, h), p + "gate_exps": (e, mi, h), p + "up_exps": (e, mi, h),
                           p + "down_exps": (e, h, mi)})
            si = spec.shared_expert_intermediate_size
            if si:
                shapes.update({p + "shared_gate": (si, h), p + "shared_up": (si, h), p + "shared_down": (h, si),
                               p + "shared_expert_gate": (1, h)})
        else:
            shapes.update({p + "gate": (inter, h), p + "up": (inter, h), p + "down": (h, inter)})
        if spec.qk_norm:
            shapes.update({p + "q_norm": (spec.head_dim,), p + "k_norm": (spec.head_dim,)})
        if spec.gemma_block:
            shapes.update({p + "post_attn_norm": (h,), p + "post_ffn_norm": (h,)})
    return shapes


def _field_of(name: str) -> str:
    short = name.rsplit(".", 1)[-1]
    return {
        "embed": "vocab_size x hidden_size", "lm_head": "vocab_size x hidden_size", "norm": "hidden_size",
        "attn_norm": "hidden_size", "ffn_norm": "hidden_size", "post_attn_norm": "hidden_size", "post_ffn_norm": "hidden_size", "q_norm": "head_dim", "k_norm": "head_dim",
        "q": "num_heads*head_dim x hidden_size", "k": "num_kv_heads*head_dim x hidden_size",
        "v": "num_kv_heads*head_dim x hidden_size", "o": "hidden_size x num_heads*head_dim",
        "q_bias": "num_heads*head_dim", "k_bias": "num_kv_heads*head_dim", "v_bias": "num_kv_heads*head_dim",
        "gate": "intermediate_size x hidden_size", "up": "intermediate_size x hidden_size",
        "down": "hidden_size x intermediate_size", "router": "num_experts x hidden_size",
        "gate_exps": "num_experts x moe_intermediate_size x hidden_size",
        "up_exps": "num_experts x moe_intermediate_size x hidden_size",
        "down_exps": "num_experts x hidden_size x moe_intermediate_size",
        "shared_gate": "shared_expert_intermediate_size x hidden_size",
        "shared_up": "shared_expert_intermediate_size x hidden_size",
        "shared_down": "hidden_size x shared_expert_intermediate_size", "shared_expert_gate": "1 x hidden_size",
    }.get(short, "")


def check_tensors(source, where: str, stored_name=lambda name: name) -> None:
    """Every tensor the model uses has the shape the spec implies and a type that fits it.

    `stored_name(canonical)` gives the name in the file, for the message.
    """
    spec = source.spec
    expected = expected_shapes(spec)
    present = set(source.names())
    missing = [n for n in expected if n not in present and n != "lm_head" and (spec.attention_bias or not n.endswith("_bias"))]
    if missing:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise ModelFormatError(
            f"{where}: the header implies tensors that are not there ({shown}); the model is incomplete: re-download it"
        )
    for name in source.names():
        need = expected.get(name)
        if need is None:  # a layer beyond num_layers: not loaded
            continue
        info = source.info(name)
        label = f"tensor {stored_name(name)!r} ({name})"
        if tuple(info.shape) != need:
            raise ModelFormatError(
                f"{where}: {label} has shape {list(info.shape)}, but the architecture needs {list(need)} "
                f"({_field_of(name)} from the header); the weights do not match the header: re-convert or re-download the model"
            )
        is_vector = name == "norm" or name.rsplit(".", 1)[-1] in (*_NORMS, "q_bias", "k_bias", "v_bias")
        if is_vector and info.qtype not in FLOAT_TYPES:
            raise ModelFormatError(
                f"{where}: {label} is stored as {info.qtype}, but norms and biases must be F32, F16 or BF16; "
                "re-convert the model"
            )
        fmt = QUANT_FORMATS.get(info.qtype)
        if fmt is not None and need[-1] % fmt.block_size:
            raise ModelFormatError(
                f"{where}: {label} is {info.qtype}, whose blocks hold {fmt.block_size} weights, but its rows have "
                f"{need[-1]}; the file is corrupt: re-convert or re-download it"
            )
