"""`lowgear bench`'s models: an in-memory WeightSource of random tensors of real shapes, made on the
device one tensor at a time (no file, no download), and the Config / tokenizer stand-ins that let
the normal loading path (Config → Model → Cache → load_autosplit) run on it.
"""

from __future__ import annotations

import math

import torch

from ..formats.blocks import get_format
from ..formats.gptq import GPTQWeight, gptq_groups
from ..formats.spec import ModelSpec, PackedTensor, TensorInfo
from .synthetic import SCALE_FIELDS

# bench name -> packed format of the linear layers (None: float, in the run dtype); gptq4 is a GPTQ
# folder's layout (4-bit, groups of 128 along K, no act-order, lm_head left in float16), as ExLlamaV2
# users hold their models
QUANTS = {"float": None, "q4_0": "Q4_0", "q8_0": "Q8_0", "q4_k": "Q4_K", "q6_k": "Q6_K", "gptq4": "GPTQ4g128"}
DEFAULT_QUANTS = ("float", "q4_0")
GPTQ_BITS, GPTQ_GROUP = 4, 128

# the model shapes `lowgear bench --preset` names
_LLAMA3_SCALING = {"type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
PRESETS: dict[str, ModelSpec] = {
    "llama3-8b": ModelSpec("llama", 128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 500000.0,
                           {**_LLAMA3_SCALING, "factor": 8.0}, max_position_embeddings=131072, name="Llama-3-8B shape"),
    "llama3.2-1b": ModelSpec("llama", 128256, 2048, 8192, 16, 32, 8, 64, 1e-5, 500000.0,
                             {**_LLAMA3_SCALING, "factor": 32.0}, max_position_embeddings=131072,
                             tie_word_embeddings=True, name="Llama-3.2-1B shape"),
    "qwen2-0.5b": ModelSpec("qwen2", 151936, 896, 4864, 24, 14, 2, 64, 1e-6, 1000000.0, None,
                            max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True,
                            name="Qwen2-0.5B shape"),
    "qwen3-8b": ModelSpec("qwen3", 151936, 4096, 12288, 36, 32, 8, 128, 1e-6, 1000000.0, None,
                          max_position_embeddings=40960, qk_norm=True, name="Qwen3-8B shape"),
    "gemma3-12b": ModelSpec("gemma3", 262208, 3840, 15360, 48, 16, 8, 256, 1e-6, 1000000.0,
                            {"type": "linear", "factor": 8.0}, max_position_embeddings=131072,
                            tie_word_embeddings=True, sliding_window=1024, qk_norm=True,
                            sliding_layers=tuple((i + 1) % 6 != 0 for i in range(48)), rope_local_theta=10000.0,
                            attn_scale=256 ** -0.5, gemma_block=True, name="Gemma-3-12B shape"),
    "mixtral-8x7b": ModelSpec("mixtral", 32000, 4096, 14336, 32, 32, 8, 128, 1e-5, 1000000.0, None,
                              max_position_embeddings=32768, num_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=14336, moe_layers=tuple(range(32)), name="Mixtral-8x7B shape"),
    "qwen3-30b-a3b": ModelSpec("qwen3_moe", 151936, 2048, 6144, 48, 32, 4, 128, 1e-6, 1000000.0, None,
                               max_position_embeddings=40960, qk_norm=True, num_experts=128, num_experts_per_tok=8,
                               moe_intermediate_size=768, moe_layers=tuple(range(48)), name="Qwen3-30B-A3B shape"),
    "tiny": ModelSpec("llama", 512, 64, 128, 2, 4, 2, 16, 1e-5, 10000.0, None, max_position_embeddings=4096,
                      name="tiny test shape"),
}


# ---------------------------------------------------------------- the in-memory model
class RandomSource:
    """A WeightSource of random tensors of `spec`'s shapes, made on `device` when asked for, one at a time.

    Linear weights are float (std 0.02), packed in `qtype` blocks (random 4-bit codes, small
    scales), or GPTQ tensors (random codes and zero points, small scales; lm_head float, as in GPTQ
    folders); the embedding table stays float, as the roofline excludes it (one row per token).
    """

    def __init__(self, spec: ModelSpec, qtype: str | None, device: torch.device, dtype: torch.dtype, seed: int = 0):
        self.spec, self.qtype, self.device, self.dtype = spec, qtype, device, dtype
        self.seed, self._generator = seed, None
        s, h = spec, spec.hidden_size
        shapes: dict[str, tuple[int, ...]] = {"embed": (s.vocab_size, h), "norm": (h,)}
        if not s.tie_word_embeddings:
            shapes["lm_head"] = (s.vocab_size, h)
        q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        for i in range(s.num_layers):
            p = f"layers.{i}."
            shapes.update({p + "attn_norm": (h,), p + "ffn_norm": (h,), p + "q": (q_out, h), p + "k": (kv_out, h),
                           p + "v": (kv_out, h), p + "o": (h, q_out)})
            if s.is_moe_layer(i):  # the router (float, as llama.cpp keeps it) and the stacked experts
                e, mi = s.num_experts, s.moe_intermediate_size
                shapes.update({p + "router": (e, h), p + "gate_exps": (e, mi, h), p + "up_exps": (e, mi, h),
                               p + "down_exps": (e, h, mi)})
            else:
                shapes.update({p + "gate": (s.intermediate_size, h), p + "up": (s.intermediate_size, h),
                               p + "down": (h, s.intermediate_size)})
            if s.attention_bias:
                shapes.update({p + "q_bias": (q_out,), p + "k_bias": (kv_out,), p + "v_bias": (kv_out,)})
            if s.qk_norm:
                shapes.update({p + "q_norm": (s.head_dim,), p + "k_norm": (s.head_dim,)})
            if s.gemma_block:
                shapes.update({p + "post_attn_norm": (h,), p + "post_ffn_norm": (h,)})
        self.shapes = shapes

    def _packed(self, name: str) -> bool:
        if self.qtype == QUANTS["gptq4"] and name == "lm_head":
            return False  # GPTQ checkpoints keep the output head in float16
        shape = self.shapes[name]
        if self.qtype is None or len(shape) == 1 or name == "embed" or name.endswith("router"):
            return False
        # rows narrower than a block multiple stay float, as llama.cpp's quantizer leaves them
        return self.qtype == QUANTS["gptq4"] or shape[-1] % get_format(self.qtype).block_size == 0

    def names(self) -> list[str]:
        return list(self.shapes)

    def info(self, name: str) -> TensorInfo:
        shape = self.shapes[name]
        stack = math.prod(shape[:-2])  # experts of a stacked tensor (1 for a linear)
        if self._packed(name) and self.qtype == QUANTS["gptq4"]:
            n, k = shape[-2:]
            groups = gptq_groups(k, GPTQ_GROUP)
            return TensorInfo(self.qtype, shape, stack * (k * n * GPTQ_BITS // 8 + groups * n * 2 + groups * n * GPTQ_BITS // 8))
        if self._packed(name):
            return TensorInfo(self.qtype, shape, stack * shape[-2] * get_format(self.qtype).row_bytes(shape[-1]))
        return TensorInfo("F16", shape, math.prod(shape) * 2)

    def nbytes(self, name: str) -> int:
        return self.info(name).nbytes

    def float_elements(self, name: str) -> int | None:
        return None if self._packed(name) else math.prod(self.shapes[name])

    def get(self, name: str):
        shape = self.shapes[name]
        if self._generator is None:
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed)
        if len(shape) == 3 and self._packed(name):  # stacked experts: E random weights of one expert's shape
            parts = [self._random(name, shape[1:]) for _ in range(shape[0])]
            if isinstance(parts[0], PackedTensor):
                return PackedTensor(self.qtype, torch.cat([p.data for p in parts]), (shape[0] * shape[1], shape[2]))
            return tuple(parts)
        return self._random(name, shape)

    def _random(self, name: str, shape: tuple[int, ...]):
        g, dev = self._generator, self.device
        if self._packed(name) and self.qtype == QUANTS["gptq4"]:
            n, k = shape
            groups = gptq_groups(k, GPTQ_GROUP)
            words = lambda *sh: torch.randint(-(1 << 31), 1 << 31, sh, dtype=torch.int64, device=dev,  # noqa: E731
                                              generator=g).to(torch.int32)
            # (code - zero) spans -15 .. 15 here (random zero points), twice Q4_0's -8 .. 7: half its scale
            scales = torch.full((groups, n), 0.001, dtype=torch.float16, device=dev)
            return GPTQWeight(words(k * GPTQ_BITS // 32, n), words(groups, n * GPTQ_BITS // 32), scales, None,
                              GPTQ_BITS, GPTQ_GROUP, False, 1)
        if self._packed(name):
            fmt = get_format(self.qtype)
            rows, cols = shape
            blocks = torch.randint(0, 256, (rows, cols // fmt.block_size, fmt.block_bytes), dtype=torch.uint8, device=dev, generator=g)
            fields, base = SCALE_FIELDS[fmt.name]  # the f16 scale / min fields, set to sane values
            for offset, mult in fields:
                value = torch.full((1, 1, 1), 0.02 * base * mult, dtype=torch.float16, device=dev)
                blocks[..., offset : offset + 2] = value.view(torch.uint8)  # [1, 1, 2]
            return PackedTensor(self.qtype, blocks.view(rows, -1), shape)
        if name.endswith("norm"):
            return torch.ones(shape, dtype=torch.float32, device=dev)
        return torch.empty(shape, dtype=self.dtype, device=dev).normal_(0.0, 0.02, generator=g)


def synthetic_config(spec: ModelSpec, quant: str, device: torch.device, dtype: torch.dtype, label: str,
                     seed: int = 0):
    """A lowgear Config whose weights come from a RandomSource (no model file); one seed, one set of weights."""
    from ..config import Config

    config = Config()
    config.spec, config._source = spec, RandomSource(spec, QUANTS[quant], device, dtype, seed)
    config.max_seq_len = spec.max_position_embeddings
    config.devices = [label]
    config.dtype = str(dtype).removeprefix("torch.")
    return config


def synthetic_model(spec: ModelSpec, quant: str, device: torch.device, cache_tokens: int, page_size: int,
                    backend: str = "triton", dtype: torch.dtype = torch.float16, label: str = "0"):
    """(model, cache): a random-weight model of `spec` on one device with a paged cache of `cache_tokens`
    tokens, attention on `backend` (what the GPU benchmark scripts time)."""
    from ..cache.kv import Cache
    from ..model.model import Model

    config = synthetic_config(spec, quant, device, dtype, label)
    config.attn_backend = backend
    model = Model(config)
    cache = Cache(model, max_seq_len=cache_tokens, page_size=page_size)
    model.load_autosplit(cache)
    return model, cache


class _NullTokenizer:
    """The little the generator needs of a tokenizer when prompts are token ids and text is not read."""

    stop_token_ids: frozenset = frozenset()

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def token_bytes_table(self, decode_special_tokens: bool = False) -> list[bytes]:
        return [b"x"] * self.vocab_size


# ---------------------------------------------------------------- timing and ceilings


def generator_step_seconds(gen, batch: int, context: int, vocab: int, steps: int, seed: int | None = None,
                           tokens_out: list | None = None) -> float:
    """Mean wall seconds per all-decode DynamicGenerator step with `batch` greedy jobs of `context` random
    prompt tokens, over `steps` consecutive iterate() calls (prefill and two steps first, untimed; jobs
    cancelled after). Steady state, as a caller streaming tokens sees it: a step the generator runs ahead
    overlaps the host's work on the step before, so a sync between calls would hide or double-count it.
    `tokens_out`, if given, receives each job's generated tokens (a list per job) before the cancel.

    Jobs whose prefill ends early decode while the others' chunks run, so each may make a token per prefill
    step before the timing starts: max_new_tokens covers those steps, and every job must still be running
    when the timing ends (else the timed steps had fewer rows than `batch`: a RuntimeError)."""
    import time

    from ..engine.job import DynamicJob
    from ..engine.sampler import Sampler

    g = torch.Generator().manual_seed(batch if seed is None else seed)
    chunk = max(1, int(getattr(gen, "max_chunk_size", 0) or context))
    prefill_steps = -(-batch * context // chunk) + batch  # chunks, and a partial one per prompt at most
    jobs = [DynamicJob(input_ids=torch.randint(3, vocab, (context,), generator=g).tolist(),
                       max_new_tokens=prefill_steps + steps + 8, gen_settings=Sampler.Settings.greedy())
            for _ in range(batch)]
    gen.enqueue(jobs)
    while any(len(j.generated) == 0 for j in jobs):
        gen.iterate()
    cuda = any(d.type == "cuda" for d in gen.model.layer_devices)
    for _ in range(2):
        gen.iterate()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        gen.iterate()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    ended = sum(j.finished for j in jobs)
    if tokens_out is not None:
        tokens_out.extend(list(j.generated) for j in jobs)
    for j in jobs:
        gen.cancel(j)
    gen.iterate()
    if ended:
        raise RuntimeError(f"{ended} of {batch} jobs ended before the timed steps did: the steps timed fewer rows")
    return seconds
