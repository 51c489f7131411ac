"""The internal description of a model, independent of the file it came from.

Both readers (GGUF and Hugging Face folders) produce a `ModelSpec` (shapes, rope, tokenizer facts)
and a `WeightSource` that hands out tensors under canonical names. The model only ever sees these.

Canonical tensor names:
    embed                       [vocab, hidden]
    layers.{i}.attn_norm        [hidden]
    layers.{i}.q / k / v / o    linear weights, [out_features, in_features]
    layers.{i}.q_bias / k_bias / v_bias   (qwen2)
    layers.{i}.q_norm / k_norm  [head_dim]: RMSNorm of each q / k head before RoPE (qwen3)
    layers.{i}.ffn_norm         [hidden]
    layers.{i}.post_attn_norm / post_ffn_norm   [hidden]: RMSNorm of the attention / MLP output before
                                its residual add (gemma2, gemma3)
    layers.{i}.gate / up / down linear weights (a dense layer)
    (phi3 stores q|k|v and gate|up each as one tensor; its readers hand the parts out as row views of
    it, formats/fused.py, and the model fuses them again)
    layers.{i}.router           [experts, hidden]: a mixture-of-experts layer's router (mixtral, qwen3_moe)
    layers.{i}.gate_exps / up_exps   [experts, moe_intermediate, hidden]: every expert's gate / up, stacked
    layers.{i}.down_exps        [experts, hidden, moe_intermediate]
    layers.{i}.shared_gate / shared_up / shared_down   qwen2_moe's shared expert, a SwiGLU beside the routed ones
    layers.{i}.shared_expert_gate   [1, hidden]: sigmoid(this . x) scales the shared expert's output
    norm                        [hidden]
    lm_head                     [vocab, hidden] (absent when embeddings are tied)

Every norm weight is the multiplier the normalised row is scaled by. Gemma's checkpoints store
(multiplier - 1) (its RMSNorm scales by 1 + w); the HF reader adds the 1 in float32 as it hands the
weight out, and llama.cpp's converter already added it in a Gemma GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen2_moe",
                           "qwen3_moe")
# architectures whose attention RMS-normalises each q and k head (weights q_norm / k_norm) before RoPE
QK_NORM_ARCHITECTURES = ("qwen3", "gemma3", "qwen3_moe")
# architectures whose GGUF q/k rows are not permuted by llama.cpp's converter: RoPE rotates halves
NEOX_GGUF_ARCHITECTURES = ("qwen2", "qwen3", "gemma2", "gemma3", "phi3", "qwen2_moe", "qwen3_moe")
# Gemma's block: embeddings scaled by sqrt(hidden), RMSNorm after attention and after the MLP too
# (post_attn_norm / post_ffn_norm), GeGLU (tanh-approximated GELU) for SwiGLU, tied embeddings
GEMMA_ARCHITECTURES = ("gemma2", "gemma3")
# architectures whose feed-forward is a mixture of experts (on every layer in `ModelSpec.moe_layers`)
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, {"type": "linear", "factor": f} or
    # {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} or
    # {"type": "longrope", "short_factor": (...), "long_factor": (...), "original_max_position_embeddings",
    #  "attention_factor"} (Phi-3's LongRoPE: per-pair divisors, rotary_dim / 2 of each; model/rope.py)
    rope_scaling: dict[str, Any] | None = None
    # "neox": rotate halves (HF layout). "interleaved": rotate adjacent pairs (llama.cpp's layout
    # for llama/mistral GGUF, whose q/k rows are permuted at conversion).
    rope_style: str = "neox"
    max_position_embeddings: int = 4096
    rotary_dim: int | None = None  # dims of each q/k head that RoPE rotates (the first ones); None: all (head_dim)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (layers.{i}.q_norm / k_norm)
    # Which layers slide: None when `sliding_window` (if any) applies to every layer, else one bool per
    # layer (gemma2: every other layer; gemma3: five of every six)
    sliding_layers: tuple[bool, ...] | None = None
    # RoPE base of the sliding layers where it differs from rope_theta (gemma3: 10000, unscaled; the
    # global layers keep rope_theta and rope_scaling)
    rope_local_theta: float | None = None
    attn_scale: float | None = None  # softmax scale when not head_dim**-0.5 (gemma: query_pre_attn_scalar**-0.5)
    attn_softcap: float | None = None  # scores become cap * tanh(scores / cap) before the softmax (gemma2)
    final_softcap: float | None = None  # logits become cap * tanh(logits / cap) (gemma2)
    gemma_block: bool = False  # GEMMA_ARCHITECTURES' block (see above)
    # mixture of experts: the router's softmax over num_experts, the top num_experts_per_tok experts
    # (renormalised to sum 1 when norm_topk_prob), each a SwiGLU of moe_intermediate_size, on the
    # layers listed in moe_layers (the others are dense, of intermediate_size)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = 0  # qwen2_moe: a shared expert on every sparse layer (0: none)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def window_of(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None where it attends to every earlier position."""
        if self.sliding_window is None or (self.sliding_layers is not None and not self.sliding_layers[layer]):
            return None
        return self.sliding_window

    def local_rope(self, layer: int) -> bool:
        """Whether layer `layer` rotates with the sliding layers' own RoPE base (rope_local_theta)."""
        return self.rope_local_theta is not None and self.sliding_layers is not None and self.sliding_layers[layer]

    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe_layers

    def ffn_names(self, i: int) -> tuple[str, ...]:
        """The feed-forward tensors layer `i` holds: the router and stacked experts, or gate / up / down."""
        if not self.is_moe_layer(i):
            return ("gate", "up", "down")
        shared = ("shared_gate", "shared_up", "shared_down", "shared_expert_gate") if self.shared_expert_intermediate_size else ()
        return ("router", "gate_exps", "up_exps", "down_exps", *shared)


@dataclass
class PackedTensor:
    """A quantized weight kept in its file's block layout.

    `data` is uint8 [rows, bytes_per_row]: each row holds in_features / block_size blocks.
    `qtype` is the GGUF type name ("Q4_0", "Q4_K", ...); `shape` is the logical (rows, cols).
    """

    qtype: str
    data: torch.Tensor
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.data.numel()


@dataclass(frozen=True)
class TensorInfo:
    """What a reader knows about a stored tensor without reading it."""

    qtype: str  # "F32", "F16", "BF16" or a quant format name ("Q4_K", ...)
    shape: tuple[int, ...]  # logical shape, torch order ([out_features, in_features] for linears)
    nbytes: int  # bytes as stored


class WeightSource(Protocol):
    """What a reader hands the model: canonical names to tensors (float or packed)."""

    spec: ModelSpec

    def names(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor | PackedTensor: ...

    def nbytes(self, name: str) -> int: ...

    def info(self, name: str) -> TensorInfo: ...
