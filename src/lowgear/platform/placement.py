"""Memory planning: which device holds which layer, and how many cache tokens fit.

A plan is pure arithmetic over byte counts, so it is tested without a GPU and `doctor` can answer
"how much context fits on this T4" before anything loads. Layers go in order, filling the devices in
order; each layer brings its share of the KV cache (max_seq_len tokens × bytes per token per layer)
to the device it sits on. The embedding sits on the first device, the final norm and lm_head on the
device of the last layer (or the next one, if that is full). `max_seq_len="auto"` picks the most
tokens (a whole number of pages) that fit.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .. import defaults
from ..errors import OutOfMemoryError

GiB = 2**30


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


@dataclass(frozen=True)
class DevicePlan:
    label: str
    name: str
    budget: int  # bytes this plan may use on the device (after the reserve and any limit)
    weights: int  # layer weights + embedding/head on this device
    cache: int  # KV cache bytes of its layers
    layers: tuple[int, ...]
    holds_embed: bool
    holds_head: bool

    @property
    def total(self) -> int:
        return self.weights + self.cache

    @property
    def spare(self) -> int:
        return self.budget - self.total


@dataclass(frozen=True)
class Plan:
    devices: tuple  # hardware.DeviceInfo, in the order given
    layer_device: tuple[int, ...]  # per layer, an index into `devices`
    embed_device: int
    head_device: int
    per_device: tuple[DevicePlan, ...]
    max_seq_len: int  # cache tokens the plan sizes for
    kv_tokens_fit: int  # the most cache tokens this split could hold (>= max_seq_len)
    cache_bytes_per_token: int  # summed over all layers
    page_size: int

    @property
    def bytes_per_device(self) -> dict[str, int]:
        return {p.label: p.total for p in self.per_device}

    @property
    def used_devices(self) -> list[int]:
        return sorted({self.embed_device, self.head_device, *self.layer_device})

    def describe(self) -> str:
        rows = []
        for p in self.per_device:
            if not p.layers and not p.holds_embed and not p.holds_head:
                continue
            what = f"layers {p.layers[0]}-{p.layers[-1]}" if p.layers else "no layers"
            extra = [x for x, on in (("embed", p.holds_embed), ("norm+lm_head", p.holds_head)) if on]
            rows.append(
                f"{p.label} ({p.name}): {what}{' + ' + ' + '.join(extra) if extra else ''}; "
                f"weights {gib(p.weights)} + cache {gib(p.cache)} of {gib(p.budget)}"
            )
        return "\n".join(rows)


def kv_bytes_per_token(spec, dtype_bytes: int, kv_dtype: str = "auto") -> int:
    """K and V of every layer for one token: 2 * layers * kv_heads * head_dim * bytes."""
    return spec.num_layers * kv_bytes_per_token_per_layer(spec, dtype_bytes, kv_dtype)


def kv_bytes_per_token_per_layer(spec, dtype_bytes: int, kv_dtype: str = "auto") -> int:
    """K and V of one layer for one token; an 8-bit kv_dtype stores a byte an element (int4: half a byte) and a
    float32 scale per head."""
    if kv_dtype != "auto":
        return 2 * spec.num_kv_heads * ((spec.head_dim // 2 if kv_dtype == "int4" else spec.head_dim) + 4)
    return 2 * spec.num_kv_heads * spec.head_dim * dtype_bytes


def device_bytes(source, spec, elt: int, held=None) -> tuple[list[int], dict[str, int], Counter]:
    """Bytes per decoder layer and of embed / norm / lm_head as they will sit on the device, and bytes per stored type.

    Packed weights keep their stored bytes; held(qtype, shape, stored) -> bytes, where given, counts the packed
    linears a GPU rewrites at load (the layers' and the head's; a head-less model's head is its embedding) as held
    there, wherever the plan puts them (`ops.matmul.repack.gpu_held_bytes`). Float weights take `elt` bytes an
    element (the model dtype), except norms, kept in float32.
    """
    per_layer = [0] * spec.num_layers
    other = {"embed": 0, "norm": 0, "lm_head": 0}
    qtypes: Counter = Counter()
    info = getattr(source, "info", None)
    names = source.names()
    tied_head = "lm_head" not in names  # the model's head is then the embedding (model.Model.build_ends)
    for name in names:
        stored = source.nbytes(name)
        size = stored
        if info is not None:
            ti = info(name)
            qtypes[ti.qtype] += stored
            if ti.qtype in ("F32", "F16", "BF16"):
                size = math.prod(ti.shape) * (4 if name.endswith("norm") else elt)
            elif held is not None and (name.startswith("layers.") or name == "lm_head"
                                       or (name == "embed" and tied_head)):
                size = held(ti.qtype, ti.shape, stored)
        else:
            qtypes["?"] += stored
        if name.startswith("layers."):
            per_layer[int(name.split(".")[1])] += size
        else:
            other[name if name in other else "norm"] += size
    return per_layer, other, qtypes


def decode_read_bytes(source, spec, elt: int, per_layer: list[int]) -> list[int]:
    """Per layer, the weight bytes a batch-1 decode step reads: all of a dense layer's; of a mixture-of-experts
    layer's expert stacks only num_experts_per_tok of num_experts (every expert is stored, in `per_layer`)."""
    read = list(per_layer)
    for i in spec.moe_layers:
        stacks = 0
        for n in ("gate_exps", "up_exps", "down_exps"):
            ti = source.info(f"layers.{i}.{n}")
            stacks += math.prod(ti.shape) * elt if ti.qtype in ("F32", "F16", "BF16") else ti.nbytes
        read[i] -= stacks * (spec.num_experts - spec.num_experts_per_tok) // spec.num_experts
    return read


def split_other_bytes(spec, other) -> tuple[int, int]:
    """(embedding bytes, norm + lm_head bytes) from a mapping {"embed", "norm", "lm_head"} or a total.

    A total is split evenly when lm_head is its own tensor (it has the embedding's shape); with tied
    embeddings lm_head is the embedding, copied to the last device when that is another one.
    """
    if isinstance(other, Mapping):
        embed = int(other.get("embed", 0))
        head = int(other.get("norm", 0)) + int(other.get("lm_head", 0))
        return embed, head
    total = int(other)
    if getattr(spec, "tie_word_embeddings", False):
        return total, 0
    return total - total // 2, total // 2


def _limits(devices, per_device_limit) -> list[int | None]:
    if per_device_limit is None:
        return [None] * len(devices)
    if isinstance(per_device_limit, Mapping):
        return [per_device_limit.get(d.label, per_device_limit.get(d.index)) for d in devices]
    if isinstance(per_device_limit, (int, float)):
        return [int(per_device_limit)] * len(devices)
    limits = list(per_device_limit)
    return [int(x) if x is not None else None for x in limits] + [None] * (len(devices) - len(limits))


def device_budget(device, reserve_bytes: int, limit: int | None = None) -> int:
    have = device.free_memory or device.total_memory
    if device.kind == "cpu" and have == 0:
        have = _host_memory()
    if limit is not None:
        have = min(have, limit)
    return max(have - reserve_bytes, 0)


def _host_memory() -> int:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * GiB


def cpu_auto_cap(spec, devices: Sequence, kv_bytes_per_token: int) -> tuple[int, str] | None:
    """On a CPU-only plan, "auto" means the model's context or what a quarter of available RAM holds,
    whichever is less: (tokens, why). None when a GPU is in the plan (there "auto" fills free memory).

    Filling all free RAM made a 135M model's cache 20 GB and its first step 87 s slower than needed."""
    if not devices or any(getattr(d, "kind", "cpu") != "cpu" for d in devices):
        return None
    ram = int(devices[0].free_memory or devices[0].total_memory or _host_memory())
    by_ram = ram // defaults.CPU_AUTO_RAM_SHARE // max(int(kv_bytes_per_token), 1)
    context = int(getattr(spec, "max_position_embeddings", 0) or 0) or by_ram
    if context <= by_ram:
        return context, f"the model's context; a CPU cache is kept to 1/{defaults.CPU_AUTO_RAM_SHARE} of available RAM ({gib(ram)})"
    return by_ram, f"what 1/{defaults.CPU_AUTO_RAM_SHARE} of available RAM ({gib(ram)}) holds; the model's context is {context}"


class _Fail(Exception):
    def __init__(self, missing: int, where: str):
        self.missing, self.where = missing, where


def _assign(layer_bytes, embed, head, tied, budgets, cache_per_layer):
    """Greedy in-order fill; returns (layer_device, head_device, used) or raises _Fail."""
    n = len(budgets)
    used = [0] * n
    d = 0
    if embed > budgets[0]:
        raise _Fail(embed - budgets[0], "the embedding alone")
    used[0] = embed
    layer_device = []
    for i, w in enumerate(layer_bytes):
        cost = w + cache_per_layer
        while used[d] + cost > budgets[d]:
            if d == n - 1:
                rest = sum(layer_bytes[i:]) + cache_per_layer * (len(layer_bytes) - i) + head
                raise _Fail(used[d] + rest - budgets[d], f"layer {i}")
            d += 1
        used[d] += cost
        layer_device.append(d)
    last = layer_device[-1] if layer_device else 0
    for hd in range(last, n):
        need = head + (embed if tied and hd != 0 else 0)
        if used[hd] + need <= budgets[hd]:
            used[hd] += need
            return layer_device, hd, used
    raise _Fail(used[last] + head - budgets[last], "norm + lm_head")


def plan(
    spec,
    weight_bytes_per_layer: Sequence[int],
    other_bytes,
    devices: Sequence,
    cache_bytes_per_token_per_layer: int,
    max_seq_len: int | str,
    reserve_bytes: int,
    per_device_limit=None,
    page_size: int = defaults.PAGE_SIZE,
    max_tokens_cap: int | None = None,
) -> Plan:
    """Assign layers to `devices` (hardware.DeviceInfo) for a cache of `max_seq_len` tokens (or "auto")."""
    if not devices:
        raise OutOfMemoryError("no devices to place the model on")
    layer_bytes = [int(b) for b in weight_bytes_per_layer]
    embed, head = split_other_bytes(spec, other_bytes)
    tied = bool(getattr(spec, "tie_word_embeddings", False)) and not (isinstance(other_bytes, Mapping) and other_bytes.get("lm_head"))
    limits = _limits(devices, per_device_limit)
    budgets = [device_budget(d, reserve_bytes, lim) for d, lim in zip(devices, limits)]
    c = int(cache_bytes_per_token_per_layer)
    L = len(layer_bytes)

    def pages(tokens: int) -> int:
        return -(-tokens // page_size) * page_size

    def attempt(tokens: int):
        return _assign(layer_bytes, embed, head, tied, budgets, pages(tokens) * c)

    if max_seq_len == "auto":
        lo, hi = 0, max((sum(budgets) - sum(layer_bytes)) // max(c * L, 1) // page_size, 0)
        if max_tokens_cap is not None:
            hi = min(hi, max_tokens_cap // page_size)
        cpu_cap = cpu_auto_cap(spec, devices, c * L)
        if cpu_cap is not None:
            hi = min(hi, max(-(-cpu_cap[0] // page_size), 1))
        while lo < hi:  # the most pages that fit; feasibility is monotone in tokens
            mid = (lo + hi + 1) // 2
            try:
                attempt(mid * page_size)
                lo = mid
            except _Fail:
                hi = mid - 1
        tokens = lo * page_size
        if tokens == 0:
            _raise(spec, devices, budgets, reserve_bytes, layer_bytes, embed, head, tied, c, page_size, page_size, attempt, auto=True)
        layer_device, head_device, used = attempt(tokens)
        return _build(devices, budgets, layer_bytes, embed, head, tied, layer_device, head_device, tokens, c, page_size)
    tokens = int(max_seq_len)
    try:
        layer_device, head_device, used = attempt(tokens)
    except _Fail:
        _raise(spec, devices, budgets, reserve_bytes, layer_bytes, embed, head, tied, c, tokens, page_size, attempt, auto=False)
    return _build(devices, budgets, layer_bytes, embed, head, tied, layer_device, head_device, tokens, c, page_size)


def _build(devices, budgets, layer_bytes, embed, head, tied, layer_device, head_device, tokens, c, page_size) -> Plan:
    alloc = -(-tokens // page_size) * page_size
    per = []
    fit = None
    for d, dev in enumerate(devices):
        layers = tuple(i for i, x in enumerate(layer_device) if x == d)
        weights = sum(layer_bytes[i] for i in layers) + (embed if d == 0 else 0)
        if d == head_device:
            weights += head + (embed if tied and d != 0 else 0)
        cache = alloc * c * len(layers)
        per.append(DevicePlan(dev.label, dev.name, budgets[d], weights, cache, layers, d == 0, d == head_device))
        if layers:
            room = (budgets[d] - weights) // (c * len(layers)) // page_size * page_size if c else 0
            fit = room if fit is None else min(fit, room)
    return Plan(
        devices=tuple(devices),
        layer_device=tuple(layer_device),
        embed_device=0,
        head_device=head_device,
        per_device=tuple(per),
        max_seq_len=tokens,
        kv_tokens_fit=max(fit or 0, tokens),
        cache_bytes_per_token=c * len(layer_bytes),
        page_size=page_size,
    )


def _raise(spec, devices, budgets, reserve, layer_bytes, embed, head, tied, c, tokens, page_size, attempt, auto: bool):
    weights = sum(layer_bytes) + embed + head
    cache = tokens * c * len(layer_bytes)
    try:
        attempt(tokens)
        missing = 0
    except _Fail as fail:
        missing = fail.missing
    missing = max(missing, weights + cache - sum(budgets), 1)
    names = ", ".join(d.describe() for d in devices)
    name = getattr(spec, "name", "") or getattr(spec, "arch", "model")
    have = f"{gib(sum(budgets))} usable on {names} (after a {gib(reserve)} reserve per device)"
    if auto:
        head_line = f"{name}'s weights ({gib(weights)}) leave no room for even one page ({tokens} tokens) of cache: {have}"
    else:
        head_line = f"{name} needs {gib(weights)} of weights + {gib(cache)} of cache for {tokens} tokens, but there is {have}"
    advice = []
    if not auto:
        try:
            probe = plan_tokens_fit(layer_bytes, embed, head, budgets, c, page_size, tied)
        except Exception:
            probe = 0
        if probe > 0:
            advice.append(f"a smaller max_seq_len (at most {probe} tokens fit; or 'auto')")
    advice.append("a quantized model (4-bit weights take about a quarter of float16's bytes)")
    advice.append("another or an additional device (config.devices / LOWGEAR_DEVICES)")
    raise OutOfMemoryError(f"{head_line}: {gib(missing)} missing. Try " + ", or ".join(advice) + ".")


def plan_tokens_fit(layer_bytes, embed, head, budgets, c, page: int = 16, tied: bool = False) -> int:
    """The most cache tokens (a multiple of `page`) the greedy fill can place; 0 when none."""
    lo, hi = 0, max((sum(budgets) - sum(layer_bytes) - embed - head) // max(c * len(layer_bytes), 1) // page, 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            _assign(layer_bytes, embed, head, tied, budgets, mid * page * c)
            lo = mid
        except _Fail:
            hi = mid - 1
    return lo * page


@dataclass(frozen=True)
class CpuWeights:
    """How packed weights live on a CPU: 4-bit layers for torch's int4 kernel, the others unpacked once at load
    into float weights or kept packed."""

    unpack: bool  # the packed layers not held as int4 are unpacked to float at load
    mode: str  # the setting asked for: auto | int4 | unpacked | packed
    why: str
    packed_bytes: int  # the packed tensors as stored
    unpacked_bytes: int  # the same tensors as float weights (0 when nothing is packed)
    held_bytes: int  # every weight as it will be held on the CPU under this choice
    int4: bool = False  # 4-bit layers (ops/matmul/cpu_int4.TYPES) held for torch's int4 kernel
    int4_layers: int = 0


def cpu_weights(source, mode: str, elt: int, cache_bytes: int = 0, ram: int | None = None,
                int4_bytes=None) -> CpuWeights:
    """Decide how a CPU holds its packed weights (model/load.py, doctor).

    A decode step reads every weight once, so bytes decide: 4-bit GGUF layers stay 4-bit for torch's
    int4 kernel where it runs (`auto`, `int4`; not the embedding table, which is looked up by row);
    other packed layers are unpacked once into float (`elt` bytes an element) when they take at most
    1/CPU_UNPACK_RAM_SHARE of the RAM left after the cache, else stay packed and are dequantized at
    every step (86% of a 135M model's CPU decode was that). `int4_bytes(qtype, shape)`: what a layer held for
    the int4 kernel takes, None where it cannot be (ops/matmul/cpu_int4.int4_bytes where the kernel runs, else
    None). why: docs/decisions/022-cpu-int4-weights.md"""
    int4_kernel = mode in ("auto", "int4") and int4_bytes is not None
    packed = unpacked = floats = rest_unpacked = rest_packed = held4 = layers4 = 0
    info = getattr(source, "info", None)
    for name in source.names():
        stored = source.nbytes(name)
        ti = info(name) if info is not None else None
        if ti is None or ti.qtype in ("F32", "F16", "BF16"):
            floats += stored if ti is None else math.prod(ti.shape) * (4 if name.endswith("norm") else elt)
            continue
        packed += stored
        unpacked += math.prod(ti.shape) * elt
        four_bytes = int4_bytes(ti.qtype, tuple(ti.shape)) if int4_kernel and name != "embed" else None
        if four_bytes is not None:
            held4 += four_bytes
            layers4 += 1
        else:
            rest_packed += stored
            rest_unpacked += math.prod(ti.shape) * elt
    share = defaults.CPU_UNPACK_RAM_SHARE
    ram = _host_memory() if ram is None else int(ram)
    room = max(ram - int(cache_bytes), 0) // share
    int4 = layers4 > 0
    four = (f"{layers4} 4-bit layers stay 4-bit for torch's int4 kernel (activations rounded to bfloat16 inside "
            f"it; cpu_weights=unpacked for float32 throughout)") if int4 else ""
    if mode == "int4" and not int4_kernel:
        four = "cpu_weights=int4 asked for, but this torch has no int4 CPU kernel"
    if packed == 0:
        unpack, why = False, "no packed weights"
    elif mode == "unpacked":
        unpack, why = True, "asked for (cpu_weights=unpacked)"
    elif mode == "packed":
        unpack, why = False, "asked for (cpu_weights=packed): every step dequantizes the weights it reads"
    elif rest_packed == 0:
        unpack, why = False, f"{mode}: {four}"
    elif rest_unpacked <= room:
        unpack, why = True, (f"{mode}: {four + '; the other' if four else 'the'} float weights ({gib(rest_unpacked)}) fit "
                             f"in 1/{share} of the RAM available after the cache ({gib(room * share)}); no weight is "
                             f"dequantized per step")
    else:
        unpack, why = False, (f"{mode}: {four + '; the other' if four else 'the'} float weights ({gib(rest_unpacked)}) "
                              f"would not fit in 1/{share} of the RAM available after the cache ({gib(room * share)}); "
                              f"every step dequantizes the weights it reads")
    held = floats + held4 + (rest_unpacked if unpack else rest_packed)
    head_copy = _head_copy_bytes(source, info, int4, unpack, int4_bytes) if elt == 4 else 0
    if head_copy:
        why += f"; the float32 head also held in bfloat16 ({gib(head_copy)}) for steps of 2+ rows"
    return CpuWeights(unpack, mode, why, packed, unpacked, held + head_copy, int4, layers4)


def _head_copy_bytes(source, info, int4: bool, unpack: bool, int4_bytes) -> int:
    """Bytes of the bfloat16 copy ops/matmul/cpu_head.py makes of a float32 head in int4 mode (0 where none)."""
    names = set(source.names())
    head = "lm_head" if "lm_head" in names else "embed"
    ti = info(head) if (int4 and info is not None and head in names) else None
    if ti is None:
        return 0
    floating = ti.qtype in ("F32", "F16", "BF16")
    if head == "lm_head" and not floating and int4_bytes(ti.qtype, tuple(ti.shape)) is not None:
        return 0  # a 4-bit head: held for the int4 kernel
    return 2 * math.prod(ti.shape) if (floating or unpack) else 0
