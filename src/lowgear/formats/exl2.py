"""EXL2 linear weights (ExLlamaV2's format): what a layer stores, and its torch dequantization.

An EXL2 layer W [out_features, in_features] is stored as (names as in the safetensors file):

    q_weight     int32 [packed_rows, width]  codes, packed along the input dim, one stream per column
    q_scale      int32 [groups, width / 8]   4-bit scale codes, 8 columns a word, column c at bits 4*(c % 8)
    q_scale_max  fp16  [groups]              one float per group (not per column)
    q_groups     int16 [2 * groups]          (bits, first packed row) per group
    q_invperm    int32 [in_features]         input row i sits at packed row q_invperm[i]
    q_perm       (usually absent)            its inverse; ExLlamaV2 computes it as argsort(q_invperm)
    bias         fp16  [width] (optional)

width is out_features rounded up to a multiple of 32 (ExLlamaV2 pads its linears; in practice only a
vocabulary such as 32001 shows it): the extra columns are ignored.

Rows. The converter sorts the input rows by activation order (act-order, the Hessian diagonal
descending) and quantizes them in that order, so packed row k holds input row perm[k]. Those rows are
cut into groups; each group has its own bit width, 8, 6, 5, 4, 3 or 2, and groups come in descending
bit width (ExLlamaV2's kernel walks 8-bit rows, then 6-bit, ... it needs that order, this reader does
not). A group of r rows at b bits takes r * b / 32 packed rows; its q_groups entry holds b and the
index of its first packed row, and its row count is what lies up to the next group's first packed
row (the last group runs to the end of q_weight).

Codes. Inside a group each column is one little-end-first bit stream: the j-th row of the group is
bits [j*b, (j+1)*b) of the stream that starts at the group's first packed row, so 3-, 5- and 6-bit
codes straddle int32 words (32 rows fill exactly b words). That is the order ExLlamaV2's converter
writes (`pack_columns`); its CUDA kernels shuffle the bits of each block of words on load
(`shuffle_*bit_*`) into an order their half2 arithmetic likes, and the non-shuffled dequant
functions in its qdq_*.cuh read the stored order directly. Codes are unsigned with the zero in the
middle: the value is q - 2^(b-1).

Scales. A stored scale code s (0..15; the converter writes its 1..16 minus one) and the group's
q_scale_max m give the fp16 scale

    scale[g, n] = fp16( (s + 1)^2 * fp16(m / 256) )

the same two fp16 roundings as ExLlamaV2 (its loader multiplies q_scale_max by 1/256 in fp16, its
kernel multiplies by (s+1)^2 in fp16; its quantizer rounds the scales it quantizes with the same way).
So, with g the group of packed row k = invperm[i],

    W[n, i] = (q[k, n] - 2^(bits[g] - 1)) * scale[g, n]

is exact in float32 (an 8-bit integer times an fp16), and rounding it to fp16 gives ExLlamaV2's
`reconstruct` bit for bit.

Recognising a folder. ExLlamaV2 itself goes by tensor names: a linear is EXL2 when `<prefix>.q_weight`
exists (GPTQ when `<prefix>.qweight` does); its converter also writes `quantization_config` =
{"quant_method": "exl2", "bits", "head_bits", ...} into config.json, which older folders lack.

Bits per weight. `bits_per_weight` counts what ExLlamaV2's converter counts for a layer: the codes,
the scale codes, 16 bits of q_scale_max and 32 of q_groups per group, and 32 bits per input row for
the permutation, over in_features * width weights (bias excluded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ModelFormatError, UnsupportedError

EXL2_BITS = (2, 3, 4, 5, 6, 8)
_INT_DTYPES = (torch.int16, torch.int32, torch.int64)


@dataclass
class EXL2Weight:
    """One EXL2 linear layer as stored; W is [out_features, in_features]."""

    q_weight: torch.Tensor  # int32 [packed_rows, width]
    q_scale: torch.Tensor  # int32 [groups, width / 8]
    q_scale_max: torch.Tensor  # float16 [groups]
    q_groups: torch.Tensor  # int16 [2 * groups]: (bits, first packed row) per group
    q_invperm: torch.Tensor | None = None  # int [in]: the packed row of each input row
    q_perm: torch.Tensor | None = None  # int [in]: the input row of each packed row (used if q_invperm is None)
    out_features: int | None = None  # logical outputs (<= width); None: the width of q_weight

    def __post_init__(self):
        if self.out_features is None and self.q_weight.dim() == 2:
            self.out_features = int(self.q_weight.shape[1])

    @property
    def width(self) -> int:
        return int(self.q_weight.shape[1])

    @property
    def packed_rows(self) -> int:
        return int(self.q_weight.shape[0])

    @property
    def groups(self) -> int:
        return self.q_groups.numel() // 2

    @property
    def in_features(self) -> int:
        perm = self.q_invperm if self.q_invperm is not None else self.q_perm
        if perm is not None:
            return perm.numel()
        return sum(rows for _, _, rows in group_table(self.q_groups, self.packed_rows))

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.out_features), self.in_features)

    @property
    def bits_per_weight(self) -> float:
        return exl2_bits_per_weight(self.packed_rows, self.width, self.groups, self.in_features)

    @property
    def qtype(self) -> str:
        return exl2_qtype(self.bits_per_weight)

    def _perm_held(self) -> torch.Tensor | None:
        return self.q_invperm if self.q_invperm is not None else self.q_perm

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors a layer holds: codes, scales, q_scale_max, q_groups and one permutation."""
        parts = [self.q_weight, self.q_scale, self.q_scale_max, self.q_groups, self._perm_held()]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def invperm(self) -> torch.Tensor | None:
        """The packed row of each input row, long [in] (None: rows are stored in input order)."""
        if self.q_invperm is not None:
            return _as_index(self.q_invperm)
        if self.q_perm is not None:
            return torch.argsort(_as_index(self.q_perm))
        return None

    def bits_histogram(self) -> dict[int, int]:
        """Input rows per bit width."""
        hist: dict[int, int] = {}
        for bits, _, rows in group_table(self.q_groups, self.packed_rows):
            hist[bits] = hist.get(bits, 0) + rows
        return hist

    def validate(self, name: str = "EXL2 weight") -> EXL2Weight:
        """Raise a clear error unless the tensors fit each other; returns self."""
        if self.q_weight.dim() != 2 or self.q_weight.dtype != torch.int32:
            raise ModelFormatError(
                f"{name}.q_weight must be int32 [packed rows, out_features], got {self.q_weight.dtype} "
                f"{list(self.q_weight.shape)}; the checkpoint is corrupt or not EXL2"
            )
        if self.q_groups.dim() != 1 or self.q_groups.dtype not in (torch.int16, torch.int32) \
                or self.q_groups.numel() < 2 or self.q_groups.numel() % 2:
            raise ModelFormatError(
                f"{name}.q_groups must be int16 [2 * groups] ((bits, first packed row) pairs), got "
                f"{self.q_groups.dtype} {list(self.q_groups.shape)}; the checkpoint is corrupt"
            )
        table = group_table(self.q_groups, self.packed_rows, name)
        in_features = sum(rows for _, _, rows in table)
        groups, width = len(table), self.width
        if width % 8:
            raise ModelFormatError(f"{name}.q_weight has {width} columns, not a multiple of 8; the checkpoint is corrupt")
        expected = {
            "q_scale": (self.q_scale, (torch.int32,), [groups, width // 8]),
            "q_scale_max": (self.q_scale_max, (torch.float16,), [groups]),
        }
        if self.q_invperm is not None:
            expected["q_invperm"] = (self.q_invperm, _INT_DTYPES, [in_features])
        if self.q_perm is not None:
            expected["q_perm"] = (self.q_perm, _INT_DTYPES, [in_features])
        for part, (t, dtypes, shape) in expected.items():
            if list(t.shape) != shape or t.dtype not in dtypes:
                raise ModelFormatError(
                    f"{name}.{part} must be {dtypes[0]} {shape} for a layer of {groups} groups, {in_features} "
                    f"inputs and {width} output columns, got {t.dtype} {list(t.shape)}; the checkpoint is corrupt"
                )
        for part in ("q_invperm", "q_perm"):
            t = getattr(self, part)
            if t is not None and not torch.equal(torch.sort(_as_index(t).cpu()).values, torch.arange(in_features)):
                raise ModelFormatError(
                    f"{name}.{part} is not a permutation of 0..{in_features - 1}; the checkpoint is corrupt"
                )
        if not 0 < int(self.out_features) <= width:
            raise ModelFormatError(
                f"{name}: {self.out_features} output features do not fit q_weight's {width} columns; "
                "the checkpoint does not match its config.json"
            )
        return self


def _as_index(t: torch.Tensor) -> torch.Tensor:
    """Stored int16 indexes are unsigned (ExLlamaV2 reads them as uint16) -> long."""
    t = t.long()
    return t & 0xFFFF if t.dtype == torch.int16 else t


def group_table(q_groups: torch.Tensor, packed_rows: int, name: str = "EXL2 weight") -> list[tuple[int, int, int]]:
    """(bits, first packed row, input rows) per group, checked against q_weight's packed_rows."""
    flat = [v & 0xFFFF for v in q_groups.tolist()]
    bits_list, starts = flat[0::2], flat[1::2]
    table = []
    for g, (bits, start) in enumerate(zip(bits_list, starts)):
        if bits not in EXL2_BITS:
            raise UnsupportedError(
                f"{name}.q_groups: group {g} has {bits}-bit codes; EXL2 layers use "
                f"{', '.join(map(str, EXL2_BITS))}-bit groups, so the file is corrupt or from a newer format"
            )
        stop = starts[g + 1] if g + 1 < len(starts) else packed_rows
        if (g == 0 and start != 0) or stop <= start or stop > packed_rows or ((stop - start) * 32) % bits:
            raise ModelFormatError(
                f"{name}.q_groups: group {g} ({bits}-bit) spans packed rows {start}..{stop} of {packed_rows}, "
                f"which is not a whole number of {bits}-bit rows starting where the previous group ends; "
                "the checkpoint is corrupt"
            )
        table.append((bits, start, (stop - start) * 32 // bits))
    return table


def exl2_bits_per_weight(packed_rows: int, width: int, groups: int, in_features: int) -> float:
    """ExLlamaV2's count: codes + 4-bit scales + 48 bits per group + a 32-bit permutation, per weight."""
    bits = packed_rows * 32 * width + groups * (width * 4 + 16 + 32) + in_features * 32
    return bits / (in_features * width)


def exl2_qtype(bits_per_weight: float) -> str:
    """The name lowgear reports for an EXL2 layer: "EXL2_4.13bpw"."""
    return f"EXL2_{bits_per_weight:.2f}bpw"


def _row_layout(w: EXL2Weight, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per packed row k: (bit position in its column's stream, bits, group), long [in]; no host sync."""
    qg = w.q_groups.to(device=device, dtype=torch.long) & 0xFFFF
    bits, start = qg[0::2], qg[1::2]
    stop = torch.cat([start[1:], torch.full((1,), w.packed_rows, device=device, dtype=torch.long)])
    rows = (stop - start) * 32 // bits  # [groups]
    n_in = w.in_features
    group = torch.repeat_interleave(torch.arange(rows.numel(), device=device), rows, output_size=n_in)
    first_row = torch.cumsum(rows, 0) - rows
    k = torch.arange(n_in, device=device)
    row_bits = bits.index_select(0, group)
    pos = start.index_select(0, group) * 32 + (k - first_row.index_select(0, group)) * row_bits
    return pos, row_bits, group


def scales_exl2(w: EXL2Weight, out_ids: torch.Tensor) -> torch.Tensor:
    """fp16 scales [groups, n] of output columns out_ids (long [n])."""
    words = w.q_scale.index_select(1, out_ids // 8)  # [groups, n]
    codes = (words >> (4 * (out_ids % 8)).to(torch.int32)) & 15
    smax = (w.q_scale_max.float() / 256).half().float()  # fp16(m / 256), as ExLlamaV2's loader rounds it
    return (((codes + 1) ** 2).float() * smax[:, None]).half()  # exact in float32, then one fp16 rounding


def dequantize_exl2(
    w: EXL2Weight, rows: slice | torch.Tensor | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Output rows `rows` (a slice or index tensor; None: all) of W -> float [n_rows, in_features].

    Works in W.T's layout [in, n] (q_weight's, so every gather copies whole rows) with few passes
    over it: adjacent packed rows are joined once into 64-bit windows (hi word << 32 | lo word, a
    pass over the packed rows only), each input row gathers its window and shifts its code out, and
    the scale rows are gathered per input row. The result is a transposed view. No host sync.
    """
    device = w.q_weight.device
    out_ids = None
    if rows is not None:
        out_ids = torch.arange(int(w.out_features), device=device)
        out_ids = out_ids[rows.to(device) if isinstance(rows, torch.Tensor) else rows]
        q = w.q_weight.index_select(1, out_ids)  # [packed_rows, n]
    else:
        q = w.q_weight[:, : int(w.out_features)]
    pos, bits, group = _row_layout(w, device)
    inv = w.invperm()
    if inv is not None:  # index the layout by input row instead of packed row
        inv = inv.to(device)
        pos, bits, group = pos.index_select(0, inv), bits.index_select(0, inv), group.index_select(0, inv)
    lo = q.long() & 0xFFFFFFFF
    windows = torch.cat([lo[1:] << 32, lo.new_zeros((1, lo.shape[1]))]) | lo  # [packed_rows, n]
    shift, mask, zero = (pos % 32)[:, None], ((1 << bits) - 1)[:, None], (1 << (bits - 1))[:, None]
    codes = ((windows.index_select(0, pos // 32) >> shift) & mask) - zero  # [in, n]
    work = torch.float64 if dtype == torch.float64 else torch.float32
    ids = out_ids if out_ids is not None else torch.arange(int(w.out_features), device=device)
    scales = scales_exl2(w, ids).to(work).index_select(0, group)  # [in, n]
    return (codes.to(work) * scales).to(dtype).t()
