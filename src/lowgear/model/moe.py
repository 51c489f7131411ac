"""Mixture-of-experts feed-forward (mixtral, qwen3_moe): a router, then the top-k of E SwiGLU experts.

    probs = softmax(router(x) in float32)          [T, E]
    w, ids = topk(probs, k)                         torch.topk: on equal values the lower expert id
    w = w / w.sum(-1) when norm_topk_prob           (mixtral always; qwen3_moe per its config)
    y[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t]))   with e = ids[t, j]

This is transformers' MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock, in its order; Qwen2MoeSparseMoeBlock
adds a shared expert (a plain SwiGLU MLP every token runs) scaled by sigmoid(shared_expert_gate . x). Routing is torch
on every device (a softmax and a top-k over E values; no host sync). The experts are held packed and
stacked (`ExpertLinear`: one [E, ...] tensor per stored part, gate|up fused per expert), never as E
separate float copies. Two ways to run them:

- the grouped torch path (CPU, and any weight a kernel does not take): tokens sorted by expert, and
  only experts that got a token run, each as one matmul over its tokens. It reads the counts on the
  host (one sync), so a CUDA step through it cannot be graphed.
- a kernel hook (`self.kernel`, set at load from the device's ops: ops/matmul/moe_gemv.py): a GEMV
  over the [T * k] (token, expert) rows that indexes the stacked weights by expert id on the device,
  so a decode step reads only the chosen experts' bytes and makes no host sync. At batch 1 it runs one
  program per row; where a batch's rows share experts it groups them by expert on the device (a sort,
  no host sync) and reads each chosen expert once for all its rows, the union `bytes_read` counts.

`bytes_read(ids)` counts the weight bytes a step with that routing reads (router + distinct experts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ModelFormatError, UnsupportedError
from ..formats.dequant import band_width, banded_matmul, dequantize_data
from ..formats.exl2 import EXL2Weight
from ..formats.gptq import GPTQWeight, dequantize_gptq
from ..formats.spec import PackedTensor
from .fuse import fuse_weights
from .linear import DEFAULT_CHUNK_ELEMENTS, QuantLinear

_FLOAT_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class ExpertLinear(nn.Module):
    """E linears of one shape, stacked: expert e maps [.., in_features] -> [.., out_features].

    `parts` are stacked weights whose output rows are concatenated per expert (gate then up): each a
    float tensor [E, N, K], a PackedTensor of E*N rows (a GGUF stack), or a tuple of E GPTQWeights.
    Held as: float `weight` [E, N, K]; GGUF `qweight` uint8 [E, N, row_bytes]; GPTQ `qweight` int32
    [E, K*b/32, N], `qzeros` [E, G, N*b/32], `scales` (fp16 bits as int16) [E, G, N], `g_idx` [E, K] or None.
    """

    def __init__(self, parts: Sequence, num_experts: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        super().__init__()
        self.num_experts = e = int(num_experts)
        self.chunk_elements = int(chunk_elements)
        self._gptq: dict | None = None
        self._packed_qtype: str | None = None
        self.unpacked_from: str | None = None
        first = parts[0]
        if isinstance(first, tuple) and isinstance(first[0], EXL2Weight):
            raise UnsupportedError("EXL2 experts are not supported: lowgear runs mixture-of-experts layers from float, "
                                   "GPTQ and GGUF weights")
        if isinstance(first, tuple):  # GPTQ, one weight per expert: fuse each expert's parts, then stack
            experts = []
            for i in range(e):
                each = [p[i] for p in parts]
                w = each[0] if len(each) == 1 else fuse_weights(each)
                if not isinstance(w, GPTQWeight) or w.qzeros is None:
                    raise UnsupportedError("the experts' GPTQ gate and up cannot be fused (different group sizes or "
                                           "act-order); re-quantize them alike")
                experts.append(w.validate())
            f = experts[0]
            self._gptq = {"bits": f.bits, "group_size": f.group_size, "sym": f.sym, "zero_offset": f.zero_offset}
            self._packed_qtype = f.qtype
            self.out_features, self.in_features = f.shape
            self.register_buffer("qweight", torch.stack([w.qweight for w in experts]))
            self.register_buffer("qzeros", torch.stack([w.qzeros for w in experts]))
            self.register_buffer("scales", torch.stack([w.scales for w in experts]).view(torch.int16))
            self.register_buffer("g_idx", None if f.g_idx is None else torch.stack([w.g_idx for w in experts]))
            self.weight = None
        elif isinstance(first, PackedTensor):
            if any(not isinstance(p, PackedTensor) or p.qtype != first.qtype for p in parts):
                raise ModelFormatError("an expert stack mixes quant types; lowgear fuses gate and up of one type")
            datas = [p.data.reshape(e, p.shape[0] // e, -1) for p in parts]
            self._packed_qtype = first.qtype
            self.out_features = sum(int(d.shape[1]) for d in datas)
            self.in_features = int(first.shape[1])
            self.register_buffer("qweight", torch.cat(datas, dim=1) if len(datas) > 1 else datas[0])
            self.weight = None
        else:
            w = torch.cat(list(parts), dim=1) if len(parts) > 1 else first
            if w.dim() != 3 or w.shape[0] != e:
                raise ModelFormatError(f"an expert stack must be [{e}, out, in], got {list(w.shape)}")
            self.out_features, self.in_features = int(w.shape[1]), int(w.shape[2])
            self.qweight = None
            self.weight = nn.Parameter(w, requires_grad=False)

    @property
    def packed(self) -> bool:
        return self.qweight is not None

    @property
    def qtype(self) -> str:
        return self._packed_qtype if self.packed else _FLOAT_NAMES.get(self.weight.dtype, str(self.weight.dtype))

    @property
    def device(self) -> torch.device:
        return (self.qweight if self.packed else self.weight).device

    @property
    def nbytes(self) -> int:
        """Bytes every expert occupies as held."""
        return sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))

    @property
    def expert_nbytes(self) -> int:
        """Bytes one expert occupies (what a step reads per chosen expert)."""
        return self.nbytes // self.num_experts

    def expert_gptq(self, e: int) -> GPTQWeight:
        return GPTQWeight(self.qweight[e], self.qzeros[e], self.scales[e].view(torch.float16),
                          None if self.g_idx is None else self.g_idx[e], **self._gptq)

    def dequant(self, e: int, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """Output rows `rows` of expert e -> float [n, in]."""
        if self._gptq is not None:
            return dequantize_gptq(self.expert_gptq(e), rows, dtype)
        if self.packed:
            return dequantize_data(self._packed_qtype, self.qweight[e, rows], dtype)
        return self.weight[e, rows].to(dtype)

    def expert_matmul(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] @ expert e's weight.T -> [n, out] in x's dtype; packed experts a band of rows at a time."""
        if not self.packed:
            w = self.weight[e]
            return torch.matmul(x.to(w.dtype), w.t()).to(x.dtype)
        return banded_matmul(x, self.out_features, self.chunk_elements,
                             lambda r0, r1: self.dequant(e, slice(r0, r1), x.dtype).t())

    def unpack_(self, dtype: torch.dtype = torch.float32) -> "ExpertLinear":
        """Hold every expert as float [E, N, K] in `dtype` (a CPU with room: model/load.py)."""
        if not self.packed:
            return self
        w = torch.empty(self.num_experts, self.out_features, self.in_features, dtype=dtype, device=self.device)
        step = band_width(self.out_features, self.in_features, self.chunk_elements)
        for e in range(self.num_experts):
            for r0 in range(0, self.out_features, step):
                w[e, r0:r0 + step] = self.dequant(e, slice(r0, r0 + step), dtype)
        self.unpacked_from = self._packed_qtype
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            self._buffers.pop(name, None)
        self.qweight, self._gptq = None, None
        self.weight = nn.Parameter(w, requires_grad=False)
        return self

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"qtype={self.qtype}")


class SparseMoE(nn.Module):
    """The router and the experts of one layer; `forward(x, ops)` as MLP's."""

    def __init__(self, router: QuantLinear, gate_up: ExpertLinear, down: ExpertLinear, top_k: int, norm_topk_prob: bool,
                 shared: nn.Module | None = None, shared_gate: QuantLinear | None = None):
        super().__init__()
        if gate_up.out_features != 2 * down.in_features or router.out_features != gate_up.num_experts:
            raise ModelFormatError(f"experts' gate|up ({gate_up.out_features} rows), down ({down.in_features} inputs) and "
                                   f"router ({router.out_features} experts) disagree: the weight file does not match its config")
        self.router, self.gate_up, self.down = router, gate_up, down
        self.num_experts, self.top_k, self.norm_topk_prob = gate_up.num_experts, int(top_k), bool(norm_topk_prob)
        self.shared, self.shared_gate = shared, shared_gate  # qwen2_moe's shared expert (an MLP) and its gate
        self.kernel = None  # fn(x, weights, ids, moe, ops) -> y, or None where it declines (ops/matmul/moe_gemv.py)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights float32 [T, k], expert ids int64 [T, k]), as transformers' router."""
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        weights, ids = self.route(x)
        y = self.kernel(x, weights, ids, self, ops) if self.kernel is not None else None
        if y is None:
            y = self.grouped(x, weights, ids, ops)
        if self.shared is not None:
            y = y + torch.sigmoid(self.shared_gate(x)) * self.shared.forward(x, ops)
        return y

    def grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, ops) -> torch.Tensor:
        """The torch path: tokens grouped by expert; only experts with tokens run (in expert order, as transformers)."""
        t, k = ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # the host sync
        out = torch.zeros(t, self.down.out_features, dtype=torch.float32, device=x.device)
        w = weights.reshape(-1)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = order[start:start + n]
                tokens = rows // k
                h = ops.silu_mul(self.gate_up.expert_matmul(e, x.index_select(0, tokens)))
                y = self.down.expert_matmul(e, h)
                out.index_add_(0, tokens, y.float() * w.index_select(0, rows)[:, None])
            start += n
        return out.to(x.dtype)

    def bytes_read(self, ids: torch.Tensor) -> int:
        """Weight bytes a step routed as `ids` [T, k] reads: the router and each distinct chosen expert once."""
        chosen = int(torch.unique(ids).numel())
        shared = 0 if self.shared is None else sum(t.numel() * t.element_size() for t in
                                                   (*self.shared.parameters(), *self.shared.buffers(), *self.shared_gate.parameters()))
        return self.router.nbytes + shared + chosen * (self.gate_up.expert_nbytes + self.down.expert_nbytes)
