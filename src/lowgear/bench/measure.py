"""What `lowgear bench` measures its figures against: the device's own ceilings (copy bandwidth, a large
matmul's FLOP/s), timed in the same run, and the bytes and FLOPs a step must move or do."""

from __future__ import annotations

import statistics
import time

import torch

from ..formats.spec import ModelSpec


class Timer:
    """Median time of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median(self, fn, warmup: int, iters: int, slow_s: float = 1.0) -> float:
        """Median of `iters` timed calls after `warmup` untimed ones; a call slower than `slow_s` gets 3 timed calls."""
        t0 = time.perf_counter()
        fn()
        self.sync()
        if time.perf_counter() - t0 > slow_s:
            warmup, iters = 1, min(iters, 3)
        for _ in range(warmup - 1):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def measure_bandwidth(timer: Timer, quick: bool) -> float:
    """Device memory bandwidth in bytes/s from a large copy (bytes read + written ÷ time)."""
    n = (64 if timer.device.type == "cpu" or quick else 1024) * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=timer.device).fill_(1.0)
    dst = torch.empty_like(src)
    t = timer.median(lambda: dst.copy_(src), warmup=2, iters=5 if quick else 20)
    del src, dst
    return 2 * n * 4 / t


def measure_matmul(timer: Timer, dtype: torch.dtype, quick: bool) -> float:
    """Peak matmul FLOP/s in `dtype` from a large square product on random data."""
    n = 1024 if timer.device.type == "cpu" else (4096 if quick else 8192)
    a = torch.randn(n, n, device=timer.device, dtype=dtype)
    b = torch.randn(n, n, device=timer.device, dtype=dtype)
    t = timer.median(lambda: torch.matmul(a, b), warmup=2, iters=3 if quick else 10)
    return 2 * n**3 / t


def source_bytes(source, dtype: torch.dtype) -> int:
    """Bytes a WeightSource's tensors will take on the device: packed as stored, float in `dtype`."""
    elt = torch.empty((), dtype=dtype).element_size()
    count = getattr(source, "float_elements", None)
    total = 0
    for name in source.names():
        n = count(name) if count is not None else None
        total += n * elt if n is not None else source.nbytes(name)
    return total


def step_weight_bytes(model, batch: int, all_experts: bool = False) -> int:
    """Weight bytes one step reads: every layer, the final norm and lm_head; `batch` rows of an untied embedding.

    A mixture-of-experts layer reads its router and the experts chosen: at most min(E, batch * top_k) of
    them (every expert with `all_experts`); a given routing's exact count is `SparseMoE.bytes_read(ids)`."""
    def module_bytes(m) -> int:
        return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))

    def layer_bytes(layer) -> int:
        mlp = layer.mlp
        if all_experts or not getattr(mlp, "num_experts", 0):
            return module_bytes(layer)
        chosen = min(mlp.num_experts, batch * mlp.top_k)
        experts = module_bytes(mlp.gate_up) + module_bytes(mlp.down)
        return module_bytes(layer) - experts + chosen * (experts // mlp.num_experts)

    total = sum(layer_bytes(layer) for layer in model.layers) + module_bytes(model.norm) + module_bytes(model.lm_head)
    if model.embed is not model.lm_head:
        total += batch * module_bytes(model.embed) // model.spec.vocab_size
    return total


def kv_bytes(spec: ModelSpec, dtype: torch.dtype, tokens: int) -> int:
    """K and V bytes of `tokens` cached positions over all layers."""
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * torch.empty((), dtype=dtype).element_size() * tokens


def prefill_flops(spec: ModelSpec, tokens: int) -> float:
    """Matmul FLOPs of one causal prompt of `tokens` tokens (linears, attention, lm_head for the last token)."""
    s = spec
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    per_token = s.num_layers * (s.hidden_size * (2 * q + 2 * kv) + 3 * s.hidden_size * s.intermediate_size)
    attention = s.num_layers * s.num_heads * s.head_dim * tokens * tokens * 2  # QK^T and PV, causal half of each
    return 2.0 * per_token * tokens + attention + 2.0 * s.vocab_size * s.hidden_size


def _memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(device), "reserved_bytes": torch.cuda.memory_reserved(device)}


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _free_bytes(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
