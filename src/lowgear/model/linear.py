"""`QuantLinear`: a linear layer (and embedding table) whose weight may stay packed.

Decode is memory-bound, so a quantized weight is kept as its file's packed blocks (a uint8 buffer,
never a full float copy). The torch path here dequantizes a band of output rows at a time into the
activation dtype and multiplies — the band bounds the float temporary (`chunk_elements`), and a
band of rows is also what cuBLAS wants for prefill. A faster kernel plugs in through `self.kernel`
(None by default): any callable `kernel(x, module) -> y` that reads the module's buffers, e.g. what
`lowgear.ops.matmul.kernel_for(module)` picks on a CUDA device (for float16 / bfloat16 weights
`float_kernel_for`: a GEMV for decode rows, cuBLAS past them); the bias is added here either way.

Float weights are a plain matmul in the module's dtype (`.to(dtype)` converts them). Packed
weights ignore dtype conversion (they stay uint8) but move with `.to(device)`.

GPTQ layers (`lowgear.formats.gptq.GPTQWeight`) are held as their four stored tensors (buffers
qweight / qzeros / scales / g_idx); bands come from `dequantize_gptq`. EXL2 layers
(`lowgear.formats.exl2.EXL2Weight`) likewise (buffers qweight = q_weight, q_scale, q_scale_max,
q_groups, q_invperm); bands come from `dequantize_exl2`. `self._gptq` / `self._exl2` hold each
format's facts (None for other layers), so a kernel picker can tell the formats apart.

The same module serves the embedding table: `lookup(ids)` unpacks only the rows asked for, so a
tied lm_head and embedding share one packed buffer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import ModelFormatError
from ..formats.dequant import band_width, banded_matmul, dequantize_data
from ..formats.exl2 import EXL2Weight, dequantize_exl2
from ..formats.blocks import get_format
from ..formats.gptq import GPTQWeight, dequantize_gptq
from ..formats.spec import PackedTensor

# Rows dequantized per band bound the float temporary to about this many elements (64 MiB in f32).
DEFAULT_CHUNK_ELEMENTS = 1 << 24

_FLOAT_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

Kernel = Callable[[torch.Tensor, "QuantLinear"], torch.Tensor]


class QuantLinear(nn.Module):
    def __init__(
        self,
        weight: torch.Tensor | PackedTensor | GPTQWeight | EXL2Weight,
        bias: torch.Tensor | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ):
        super().__init__()
        self.chunk_elements = int(chunk_elements)
        self.kernel: Kernel | None = None  # a packed GEMV/GEMM kernel plugs in here
        self._gptq: dict | None = None  # GPTQ facts (bits, group_size, ...) when weight is a GPTQWeight
        self.unpacked_from: str | None = None  # the file's quant type once unpack_() made the weight float
        self._exl2: dict | None = None  # EXL2 facts (bits_per_weight, bits histogram) when weight is an EXL2Weight
        self.int4_cpu = False  # held for torch's int4 CPU kernel (hold_int4_cpu: ops/matmul/cpu_int4.py)
        if isinstance(weight, EXL2Weight):
            weight.validate()
            self._packed_qtype = weight.qtype
            self.out_features, self.in_features = weight.shape
            self._exl2 = {"bits_per_weight": weight.bits_per_weight, "bits": weight.bits_histogram()}
            self.register_buffer("qweight", weight.q_weight)
            self.register_buffer("q_scale", weight.q_scale)
            # fp16 q_scale_max kept as its int16 bits so that `.to(dtype)` cannot round it
            self.register_buffer("q_scale_max", weight.q_scale_max.view(torch.int16))
            self.register_buffer("q_groups", weight.q_groups)
            inv = weight.q_invperm
            if inv is None and weight.q_perm is not None:  # hold the inverse, in the stored index dtype
                inv = weight.invperm().to(weight.q_perm.dtype)
            self.register_buffer("q_invperm", inv)
            self.weight = None
        elif isinstance(weight, GPTQWeight):
            weight.validate()
            self._packed_qtype = weight.qtype
            self.out_features, self.in_features = weight.shape
            self._hold_gptq(weight)
            self.weight = None
        elif isinstance(weight, PackedTensor):
            rows, cols = weight.shape
            fmt = get_format(weight.qtype)
            if tuple(weight.data.shape) != (rows, fmt.row_bytes(cols)) or weight.data.dtype != torch.uint8:
                raise ModelFormatError(
                    f"packed {weight.qtype} weight of shape {weight.shape} needs uint8 data "
                    f"[{rows}, {fmt.row_bytes(cols)}], got {weight.data.dtype} {list(weight.data.shape)}: "
                    "the weight file is corrupt; re-download it"
                )
            self._packed_qtype = weight.qtype
            self.out_features, self.in_features = int(rows), int(cols)
            self.register_buffer("qweight", weight.data)
            self.weight = None
        else:
            if weight.dim() != 2:
                raise ModelFormatError(f"a linear weight must be 2-D [out, in], got shape {list(weight.shape)}")
            self.out_features, self.in_features = (int(d) for d in weight.shape)
            self.qweight = None
            self.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ModelFormatError(f"bias shape {list(bias.shape)} does not match {self.out_features} output features")
            self.bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.bias = None

    @property
    def packed(self) -> bool:
        return self.qweight is not None

    @property
    def qtype(self) -> str:
        """The quant format name for packed weights, else "F32" / "F16" / "BF16" (the current dtype)."""
        if self.packed:
            return self._packed_qtype
        return _FLOAT_NAMES.get(self.weight.dtype, str(self.weight.dtype))

    @property
    def nbytes(self) -> int:
        """Bytes the weight occupies as held (packed or float), bias excluded."""
        if self._gptq is not None:
            return self.gptq_weight().nbytes
        if self.int4_cpu:
            return self.qweight.numel() * self.qweight.element_size() + self.i4_scales_zeros.numel() * 2
        if self._exl2 is not None:
            return self.exl2_weight().nbytes
        w = self.qweight if self.packed else self.weight
        return w.numel() * w.element_size()

    @property
    def device(self) -> torch.device:
        return (self.qweight if self.packed else self.weight).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype."""
        if self.kernel is not None:
            y = self.kernel(x, self)
        elif self.packed:
            y = self._banded_matmul(x)
        else:
            w = self.weight
            y = torch.matmul(x.to(w.dtype), w.t()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _hold_gptq(self, w: GPTQWeight) -> None:
        self._gptq = {"bits": w.bits, "group_size": w.group_size, "sym": w.sym, "zero_offset": w.zero_offset}
        self.register_buffer("qweight", w.qweight)
        self.register_buffer("qzeros", w.qzeros)
        if w.float_zeros is not None:  # a GGUF type with a block minimum (ops/matmul/repack.py): zeros as they are
            self.register_buffer("gptq_zeros", w.float_zeros)
        # fp16 scales kept as their int16 bits so that `.to(dtype)` cannot round them (e.g. to bf16)
        self.register_buffer("scales", w.scales.view(torch.int16))
        self.register_buffer("g_idx", w.g_idx)

    def hold_as_gptq(self, w: GPTQWeight) -> None:
        """Hold `w`, the same weight in GPTQ form (ops/matmul/repack.py), in place of the packed GGUF rows:
        every path of the module then reads it as a GPTQ layer; `qtype` still names the file's type."""
        w.validate()
        assert self._gptq is None and self._exl2 is None and self.packed and w.shape == (self.out_features,
                                                                                       self.in_features)
        self._hold_gptq(w)

    def hold_int4_cpu(self, packed: torch.Tensor, scales_zeros: torch.Tensor, kernel: Kernel) -> None:
        """Hold the weight as torch's int4 CPU kernel takes it (ops/matmul/cpu_int4.py), in place of the GGUF rows:
        `qweight` its packed codes, `i4_scales_zeros` the bfloat16 [groups, N, 2] scale and zero, kept as int16
        bits so that `.to(dtype)` cannot change them; `kernel` the matmul. `qtype` still names the file's type."""
        assert self.packed and self._gptq is None and self._exl2 is None and self.device.type == "cpu"
        self.register_buffer("qweight", packed)
        self.register_buffer("i4_scales_zeros", scales_zeros.view(torch.int16))
        self.int4_cpu, self.kernel = True, kernel

    def gptq_weight(self) -> GPTQWeight:
        """The held GPTQ tensors (on the module's device) as a GPTQWeight."""
        return GPTQWeight(self.qweight, self.qzeros, self.scales.view(torch.float16), self.g_idx, **self._gptq,
                          float_zeros=self.gptq_zeros if self.qzeros is None else None)

    def exl2_weight(self) -> EXL2Weight:
        """The held EXL2 tensors (on the module's device) as an EXL2Weight."""
        return EXL2Weight(self.qweight, self.q_scale, self.q_scale_max.view(torch.float16), self.q_groups,
                          self.q_invperm, None, self.out_features)

    def _dequant(self, rows, dtype: torch.dtype) -> torch.Tensor:
        """Rows `rows` (slice, index tensor or None for all) of the packed weight -> float [n, in]."""
        if self._gptq is not None:
            w = dequantize_gptq(self.gptq_weight(), rows, dtype)
            perm = getattr(self, "gptq_perm", None)  # a kernel sorted K in place (ops.matmul.gptq_gemv.prepare)
            if perm is None:
                return w
            out = torch.empty_like(w)
            out[:, perm.long()] = w
            return out
        if self._exl2 is not None:
            return dequantize_exl2(self.exl2_weight(), rows, dtype)
        if self.int4_cpu:  # the kernel's own product with the identity: its weights as it computes them
            eye = torch.eye(self.in_features, dtype=dtype)
            w = self.kernel(eye, self).t().to(dtype)
            return w if rows is None else w[rows]
        if rows is None:
            return dequantize_data(self.qtype, self.qweight, dtype)
        if isinstance(rows, slice):
            return dequantize_data(self.qtype, self.qweight[rows], dtype)
        return dequantize_data(self.qtype, self.qweight.index_select(0, rows), dtype)

    def unpack_(self, dtype: torch.dtype = torch.float32) -> "QuantLinear":
        """Hold the packed weight as a float `weight` [out, in] (a view of [in, out]) in `dtype` from now on (a CPU with room:
        model/load.py). Unpacked a band of rows at a time, so the temporaries stay bounded; the
        values are those the packed path makes at every step. `unpacked_from` keeps the file's type."""
        if not self.packed:
            return self
        assert not self.int4_cpu, "an int4 CPU layer is not unpacked (its GGUF rows are gone)"
        # stored [in, out] (weight is its transposed view): the CPU GEMM reads it as x @ w_t without a
        # transpose, 1.5-2x faster at 8 rows than [out, in] (measured on 2 cores, 576x3072 fp32)
        w_t = torch.empty(self.in_features, self.out_features, dtype=dtype, device=self.device)
        step = self._band_rows()
        for r0 in range(0, self.out_features, step):
            w_t[:, r0:r0 + step] = self._dequant(slice(r0, r0 + step), dtype).t()
        w = w_t.t()
        self.unpacked_from = self._packed_qtype
        for name in ("qweight", "qzeros", "scales", "g_idx", "gptq_zeros", "q_scale", "q_scale_max", "q_groups", "q_invperm",
                     "gptq_perm"):
            if name in self._buffers:
                del self._buffers[name]
        self.qweight, self._gptq, self._exl2, self.kernel = None, None, None, None
        self.weight = nn.Parameter(w, requires_grad=False)
        return self

    def _band_rows(self) -> int:
        return band_width(self.out_features, self.in_features, self.chunk_elements)

    def _banded_matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = banded_matmul(x2, self.out_features, self.chunk_elements,
                          lambda r0, r1: self._dequant(slice(r0, r1), x.dtype).t())  # [in, band]
        return y.reshape(*lead, self.out_features)

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Embedding lookup: rows `ids` (any shape) -> [*ids.shape, in_features].

        Packed tables unpack only the rows asked for, into `dtype` (float32 by default); float
        tables return the module's dtype unless `dtype` is given.
        """
        ids = ids.to(device=self.device, dtype=torch.long)
        if self.packed:
            out = self._dequant(ids.reshape(-1), dtype or torch.float32)
        else:
            out = self.weight.index_select(0, ids.reshape(-1))
            if dtype is not None:
                out = out.to(dtype)
        return out.reshape(*ids.shape, self.in_features)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full float weight [out, in] (a copy for packed weights: for tests and references)."""
        if self.packed:
            return self._dequant(None, dtype)
        return self.weight.to(dtype)

    def extra_repr(self) -> str:
        unpacked = f" (unpacked from {self.unpacked_from})" if self.unpacked_from else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}{unpacked}, "
                f"bias={self.bias is not None}")
