"""The peer in `lowgear bench`: Hugging Face transformers on the same shapes, in the same run.

transformers' LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM is built from a config made of the lowgear
ModelSpec (random weights, nothing downloaded), in float16 on the GPU (float32 on the CPU), and
timed the way transformers runs by default: a DynamicCache holding `context` tokens for each of
`batch` sequences, one new token per sequence per step. The cache is put back to its `context`
tokens after every step, so each timed step is the same step. Prefill is one prompt through a
fresh cache, keeping only the last token's logits (`logits_to_keep=1`), as lowgear does.

Only this module imports transformers, and only when the peer runs.
"""

from __future__ import annotations

import gc
import warnings

import torch

from ..formats.spec import ModelSpec


def hf_config(spec: ModelSpec, attn_implementation: str):
    """A transformers config of the same architecture and shapes as `spec`."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        rope_theta=spec.rope_theta,
    )
    if spec.rope_scaling:
        scaling = dict(spec.rope_scaling)
        scaling["rope_type"] = scaling.pop("type", "default")
        scaling.setdefault("rope_theta", spec.rope_theta)
        common["rope_scaling"] = scaling
    if spec.arch in ("mixtral", "qwen3_moe"):
        from transformers import MixtralConfig, Qwen3MoeConfig

        moe = dict(num_experts_per_tok=spec.num_experts_per_tok)
        if spec.arch == "mixtral":
            common["intermediate_size"] = spec.moe_intermediate_size
            cfg = MixtralConfig(**common, **moe, num_local_experts=spec.num_experts, head_dim=spec.head_dim)
        else:
            dense = [i for i in range(spec.num_layers) if not spec.is_moe_layer(i)]
            cfg = Qwen3MoeConfig(**common, **moe, num_experts=spec.num_experts, head_dim=spec.head_dim,
                                 moe_intermediate_size=spec.moe_intermediate_size, norm_topk_prob=spec.norm_topk_prob,
                                 mlp_only_layers=dense, use_sliding_window=False)
    elif spec.arch == "qwen3":
        cfg = Qwen3Config(**common, head_dim=spec.head_dim, attention_bias=spec.attention_bias, use_sliding_window=False)
    elif spec.arch == "qwen2":
        cfg = Qwen2Config(**common, use_sliding_window=False)
    else:
        cfg = LlamaConfig(**common, head_dim=spec.head_dim, attention_bias=spec.attention_bias)
    cfg._attn_implementation = attn_implementation
    return cfg


class HFPeer:
    """One transformers model of `spec`'s shape with random weights, on `device` in `dtype`."""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, attn_implementation: str):
        from transformers import AutoModelForCausalLM

        self.spec, self.device, self.dtype = spec, device, dtype
        self.attn_implementation = attn_implementation
        cfg = hf_config(spec, attn_implementation)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                self.model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
        finally:
            torch.set_default_dtype(previous)
        self.model.eval()
        import transformers

        self.version = transformers.__version__

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def _filled_cache(self, batch: int, context: int):
        """A DynamicCache holding `context` random tokens per sequence, and its per-layer tensors."""
        from transformers import DynamicCache

        s = self.spec
        cache = DynamicCache()
        shape = (batch, s.num_kv_heads, context, s.head_dim)
        for i in range(s.num_layers):
            k = torch.randn(shape, device=self.device, dtype=self.dtype)
            v = torch.randn(shape, device=self.device, dtype=self.dtype)
            cache.update(k, v, i)
            del k, v
        base = [(layer.keys, layer.values) for layer in cache.layers]
        return cache, base

    @staticmethod
    def _restore(cache, base) -> None:
        for layer, (k, v) in zip(cache.layers, base):
            layer.keys, layer.values = k, v

    @torch.inference_mode()
    def decode_step(self, batch: int, context: int):
        """A callable running one decode step at (batch, context), ready to be timed repeatedly."""
        cache, base = self._filled_cache(batch, context)
        ids = torch.randint(0, self.spec.vocab_size, (batch, 1), device=self.device)
        model = self.model

        def step():
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # the cache keyword's name moves across versions
                model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            self._restore(cache, base)

        return step

    def prefill_step(self, tokens: int):
        """A callable running one prompt of `tokens` tokens through a fresh cache."""
        from transformers import DynamicCache

        ids = torch.randint(0, self.spec.vocab_size, (1, tokens), device=self.device)
        model = self.model

        def step():
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)

        return step

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
