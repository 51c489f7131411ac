"""The torch KV-cache write: a step's new keys and values scattered to their flat cache slots.

The reference every fused write (ops/rope.py's rope + KV kernel) is tested against, and the write
the torch attention rungs use.

A quantized cache (`QuantizedKV`) stores each token's head vector in 8 or 4 bits with one float32
scale per token and head: int8 (round(x / s), s = max|x| / 127), float8 e4m3 (x / s, s = max|x| / 448)
or int4 (round(x / s) in -8..7, two codes to a byte, s the one of max|x| / 7 times 1, 0.95, ..., 0.7 that
quantizes the vector with the least squared error: `CLIP_RATIOS`).
It answers the few tensor calls the torch rungs make on a cache (`shape`, `view`, `index_select`,
`double`), returning dequantized values, so every gather-based rung reads it unchanged.

Before quantizing, a cache may move each head vector into a frame where it quantizes better; both
moves leave attention's output unchanged in exact arithmetic, so no kernel knows about them:
- a shift: a fixed vector per kv head (`shift` [kv_heads, head_dim]) is subtracted. For keys, q.(k - mu)
  differs from q.k by q.mu, the same for every key a query sees, which softmax ignores (not so under a
  soft-cap, which the cache therefore never shifts); for values, sum p (v - mu) = o - mu (the
  probabilities sum to 1), so the output gets mu back (`restore_output`).
- a rotation: x R for a fixed orthogonal R [head_dim, head_dim] (`head_rotation`: a normalized
  Hadamard matrix), shared by keys and values; queries are rotated the same way before attention
  (`rotate_query`: (q R).(k R) = q.k) and the output is rotated back by R^T after it (`restore_output`).
  Outlier channels are spread over every element, so the per-token scale no longer serves a few of them.
The stored (and dequantized) values are (x - shift) R; the shift is calibrated once per cache
(cache/kv.py), so every sequence and every shared prefix page sees the same one. Which moves each
storage makes: defaults.KV_SCHEMES; why: docs/decisions/025-kv-quality-rotated-shifted-kv.md.
"""

from __future__ import annotations

import math

import torch

# name -> (storage dtype, largest stored magnitude, codes per byte); the names are defaults.KV_CACHE_DTYPES'
# quantized ones. int4 codes are stored offset by 8 (0..15), two to a byte, the even element low.
KV_DTYPES = {
    "int8": (torch.int8, 127.0, 1),
    "fp8_e4m3": (torch.float8_e4m3fn, 448.0, 1),
    "int4": (torch.uint8, 7.0, 2),
}
# An integer storage's candidate scales, as fractions of max|x| / top: each vector keeps the one that
# quantizes it with the least squared error (clipping its largest element or two buys finer steps
# for the rest: 4 bits have few). int8's steps are fine enough at max|x| / 127.
CLIP_RATIOS = {"int4": (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)}


def hadamard(n: int) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix of order n (a power of two), float64: entries +-1/sqrt(n),
    symmetric and orthogonal (H H^T = I)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard matrix of Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)


def dct(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix of order n as columns (x @ dct(n) transforms x), float64."""
    k = torch.arange(n, dtype=torch.float64)
    c = torch.cos(math.pi * (k[:, None] + 0.5) * k[None, :] / n) * math.sqrt(2.0 / n)
    c[:, 0] = 1.0 / math.sqrt(n)
    return c


def head_rotation(d: int) -> torch.Tensor:
    """The orthogonal matrix [d, d] (float64) a rotated cache applies to each head vector: the normalized
    Hadamard matrix when d is a power of two; else, for d = 2^a * m (m odd), the Kronecker product of
    the order-2^a Hadamard matrix with the order-m DCT-II (head_dim 96: 32 x 3), still orthogonal."""
    p = d & -d
    return hadamard(d) if p == d else torch.kron(hadamard(p), dct(d // p))


class QuantizedKV:
    """K or V pages in 8 or 4 bits: data [pages, page_size, kv_heads, head_dim / codes per byte], scale
    [pages, page_size, kv_heads, 1] float32; `shape` is the logical [pages, page_size, kv_heads, head_dim];
    read back in `dtype`. `shift` [kv_heads, head_dim] and `rotation` [head_dim, head_dim] (float32, or
    None) are the frame the values are stored in: (x - shift) @ rotation (see the module's docstring)."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, kind: str, dtype: torch.dtype,
                 shift: torch.Tensor | None = None, rotation: torch.Tensor | None = None):
        self.data, self.scale, self.kind, self.dtype = data, scale, kind, dtype
        self.shift, self.rotation = shift, rotation
        self.per_byte = KV_DTYPES[kind][2]

    @classmethod
    def zeros(cls, shape, kind: str, dtype: torch.dtype, device, rotate: bool = False) -> "QuantizedKV":
        storage, _, per_byte = KV_DTYPES[kind]
        if shape[-1] % per_byte:
            raise ValueError(f"a {kind} KV cache needs an even head_dim, got {shape[-1]}")
        packed = (*shape[:-1], shape[-1] // per_byte)
        rotation = head_rotation(shape[-1]).to(device=device, dtype=torch.float32) if rotate else None
        return cls(torch.zeros(packed, dtype=storage, device=device),
                   torch.zeros(*shape[:-1], 1, dtype=torch.float32, device=device), kind, dtype, rotation=rotation)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.data.shape[:-1], self.data.shape[-1] * self.per_byte))

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def view(self, *shape) -> "QuantizedKV":
        return QuantizedKV(self.data.view(*shape[:-1], shape[-1] // self.per_byte), self.scale.view(*shape[:-1], 1),
                           self.kind, self.dtype, self.shift, self.rotation)

    def codes(self) -> torch.Tensor:
        """The stored values before their scale, float32 in the logical shape."""
        if self.per_byte == 1:
            return self.data.to(torch.float32)
        both = torch.stack((self.data & 0xF, self.data >> 4), dim=-1).flatten(-2)
        return both.to(torch.float32) - 8.0

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The stored values, (x - shift) @ rotation as quantized (what every attention rung reads)."""
        return (self.codes() * self.scale).to(dtype or self.dtype)

    def restore(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored values [..., kv_heads, head_dim] back in the model's frame, float64: stored @ rotation^T + shift
        (the inverse of the frame change; for tests and references, never on the step's path)."""
        x = stored.double()
        if self.rotation is not None:
            x = x @ self.rotation.double().T
        return x if self.shift is None else x + self.shift.double()

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        assert dim == 0
        data = self.data.view(torch.uint8).index_select(0, index).view(self.data.dtype)
        return QuantizedKV(data, self.scale.index_select(0, index), self.kind, self.dtype).dequantize()

    def double(self) -> torch.Tensor:
        return self.dequantize(torch.float64)

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Quantize x [T, kv_heads, head_dim] and store it at the flat slots [T]."""
        storage, top, per_byte = KV_DTYPES[self.kind]
        kvh, width = self.data.shape[-2:]
        x = x.float()
        if self.shift is not None:
            x = x - self.shift
        if self.rotation is not None:
            x = x @ self.rotation
        scale = x.abs().amax(dim=-1, keepdim=True) / top
        if self.kind == "fp8_e4m3":
            q = (x / _nonzero(scale)).clamp_(-top, top).to(storage)
        else:
            scale, q = _integer_codes(x, scale, top, CLIP_RATIOS.get(self.kind, (1.0,)))
            if per_byte == 1:
                q = q.to(storage)
            else:
                q = (q + 8).to(torch.uint8)
                q = q[..., 0::2] | (q[..., 1::2] << 4)
        # (as bytes: CPU index ops do not take float8)
        self.data.view(torch.uint8).view(-1, kvh, width).index_copy_(0, slots, q.view(torch.uint8))
        self.scale.view(-1, kvh, 1).index_copy_(0, slots, scale)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _integer_codes(x: torch.Tensor, scale: torch.Tensor, top: float, ratios) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, codes) per vector of x [..., head_dim]: of the scales ratio * `scale`, the one whose codes
    (round(x / s) in [-top - 1, top]) leave the smallest squared error; the first (largest) on a tie. All
    ratios at once along a new axis: a fixed handful of ops per write, whatever their number (a decode step
    on a GPU launches each one per layer)."""
    if len(ratios) == 1:  # int8: nothing to choose, so no search axis (fewer launches per write)
        s = scale * ratios[0]
        return s, (x / _nonzero(s)).round_().clamp_(-top - 1, top)
    s = scale.unsqueeze(-2) * _ratios(ratios, x.device).view(-1, 1)  # [..., R, 1]
    xr = x.unsqueeze(-2)  # [..., 1, D]
    q = (xr / _nonzero(s)).round_().clamp_(-top - 1, top)  # [..., R, D]
    err = (q * s - xr).square_().sum(-1)  # [..., R]
    pick = err.argmin(-1, keepdim=True)  # the first of equal errors: the largest scale
    q = q.gather(-2, pick.unsqueeze(-1).expand(*pick.shape, q.shape[-1])).squeeze(-2)
    return s.squeeze(-1).gather(-1, pick), q


_RATIOS: dict = {}


def _ratios(ratios: tuple, device: torch.device) -> torch.Tensor:
    """The ratios as a float32 tensor on `device`, made once (a step captured in a CUDA graph may not copy
    from the host; the eager steps before capture make it)."""
    key = (tuple(ratios), str(device))
    if key not in _RATIOS:
        _RATIOS[key] = torch.tensor(ratios, dtype=torch.float32, device=device)
    return _RATIOS[key]


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache, v_cache, slot_mapping: torch.Tensor) -> None:
    """Scatter new keys/values [T, kv_heads, head_dim] into caches [pages, page_size, kv_heads, head_dim]
    at the flat slots slot_mapping [T] (a step's `StepMetadata.slot_mapping`)."""
    if isinstance(k_cache, QuantizedKV):
        k_cache.write(slot_mapping, k)
        v_cache.write(slot_mapping, v)
        return
    kvh, hd = k_cache.shape[-2:]
    k_cache.view(-1, kvh, hd).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, hd).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def rotate_query(q: torch.Tensor, k_cache) -> torch.Tensor:
    """Queries [T, heads, head_dim] in the frame of a rotated key cache (q @ rotation, in q's dtype);
    q itself for every other cache."""
    if not isinstance(k_cache, QuantizedKV) or k_cache.rotation is None:
        return q
    return (q.float() @ k_cache.rotation).to(q.dtype)


def restore_output(out: torch.Tensor, v_cache) -> torch.Tensor:
    """Attention output [T, heads, head_dim] over a value cache stored as (v - shift) @ rotation, back to
    the model's frame: out @ rotation^T + shift (each query head takes its kv head's shift); out itself
    for a cache with neither."""
    if not isinstance(v_cache, QuantizedKV) or (v_cache.rotation is None and v_cache.shift is None):
        return out
    rotation, shift = v_cache.rotation, v_cache.shift
    x = out.float()
    if rotation is not None:
        x = x @ rotation.T
    if shift is not None:
        x = x + shift.repeat_interleave(out.shape[1] // shift.shape[0], dim=0)
    return x.to(out.dtype)
