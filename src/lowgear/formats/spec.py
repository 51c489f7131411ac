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
    layers.{i}.gate / up / down linear weights (a dense layer)
    layers.{i}.router           [experts, hidden]: a mixture-of-experts layer's router (mixtral, qwen3_moe)
    layers.{i}.gate_exps / up_exps   [experts, moe_intermediate, hidden]: every expert's gate / up, stacked
    layers.{i}.down_exps        [experts, hidden, moe_intermediate]
    layers.{i}.shared_gate / shared_up / shared_down   qwen2_moe's shared expert, a SwiGLU beside the routed ones
    layers.{i}.shared_expert_gate   [1, hidden]: sigmoid(this . x) scales the shared expert's output
    norm                        [hidden]
    lm_head                     [vocab, hidden] (absent when embeddings are tied)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
# architectures whose attention RMS-normalises each q and k head (weights q_norm / k_norm) before RoPE
QK_NORM_ARCHITECTURES = ("qwen3", "qwen3_moe")
# architectures whose GGUF q/k rows are not permuted by llama.cpp's converter: RoPE rotates halves
NEOX_GGUF_ARCHITECTURES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
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
    # {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict[str, Any] | None = None
    # "neox": rotate halves (HF layout). "interleaved": rotate adjacent pairs (llama.cpp's layout
    # for llama/mistral GGUF, whose q/k rows are permuted at conversion).
    rope_style: str = "neox"
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (layers.{i}.q_norm / k_norm)
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
