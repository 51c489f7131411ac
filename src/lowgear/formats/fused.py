"""Checkpoints that store q|k|v or gate|up as one tensor (phi3): the parts as row views of it.

Phi-3 keeps `qkv_proj` ([q + k + v rows, hidden]) and `gate_up_proj` ([2 * intermediate, hidden],
gate rows first); llama.cpp's phi3 GGUF the same as `attn_qkv` and `ffn_up`. A reader maps them to
the canonical names `layers.{i}.qkv` / `layers.{i}.gate_up` and hands out q, k, v, gate and up as
views of the stored rows (no copy: float rows, GGUF block rows, or GPTQ columns), so the rest of
lowgear sees the usual names; model/fuse.py then joins the parts back into one linear at load.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import ModelFormatError
from .gptq import GPTQWeight, pack_codes, unpack_bits
from .spec import ModelSpec, PackedTensor, TensorInfo

FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


def part_rows(spec: ModelSpec, fused: str) -> dict[str, tuple[int, int]]:
    """Part name -> (first row, row after the last) of fused tensor `fused` ("qkv" or "gate_up")."""
    if fused == "qkv":
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    inter = spec.intermediate_size
    return {"gate": (0, inter), "up": (inter, 2 * inter)}


def fused_rows(spec: ModelSpec, fused: str) -> int:
    return max(stop for _, stop in part_rows(spec, fused).values())


def split_names(fused_names, spec: ModelSpec) -> dict[str, tuple[str, int, int]]:
    """Canonical part name -> (the fused canonical name, first row, stop row), for each fused name given."""
    parts = {}
    for name in fused_names:
        prefix, _, short = name.rpartition(".")
        for part, (start, stop) in part_rows(spec, short).items():
            parts[f"{prefix}.{part}"] = (name, start, stop)
    return parts


def fused_in(name: str, present) -> bool:
    """Whether part `name` (layers.i.q, ...) is served from a fused tensor (layers.i.qkv / gate_up) in `present`."""
    prefix, _, short = name.rpartition(".")
    return any(short in parts and f"{prefix}.{fused}" in present for fused, parts in FUSED.items())


def rows_of(weight, start: int, stop: int):
    """Output rows start..stop of a linear weight (float [N, K], PackedTensor or GPTQWeight), as views."""
    if isinstance(weight, GPTQWeight):
        per_word = 32 // weight.bits
        if 32 % weight.bits == 0 and start % per_word == 0 and stop % per_word == 0:
            qzeros = weight.qzeros[:, start // per_word: stop // per_word]
        else:  # zero points that straddle words (3-bit): the band's, unpacked and packed again
            if (stop - start) % 32:
                raise ModelFormatError(f"a {weight.bits}-bit GPTQ part of {stop - start} outputs does not fill whole "
                                       "zero-point words; the checkpoint's fused tensor cannot be split")
            zeros = unpack_bits(weight.qzeros, weight.bits, torch.arange(start, stop))  # [groups, stop - start]
            qzeros = pack_codes(zeros.t(), weight.bits).t().contiguous()
        return replace(weight, qweight=weight.qweight[:, start:stop], scales=weight.scales[:, start:stop], qzeros=qzeros)
    if isinstance(weight, PackedTensor):
        return PackedTensor(weight.qtype, weight.data[start:stop], (stop - start, weight.shape[1]))
    return weight[start:stop]


def rows_info(info: TensorInfo, start: int, stop: int) -> TensorInfo:
    """The TensorInfo of rows start..stop of a fused [N, K] tensor (bytes in proportion)."""
    n = info.shape[0]
    return TensorInfo(info.qtype, (stop - start, *info.shape[1:]), info.nbytes * (stop - start) // n)


def check_fused_rows(info: TensorInfo, name: str, stored: str, spec: ModelSpec, where: str) -> None:
    """A fused tensor's row count is what the config's heads (or intermediate size) need."""
    need = fused_rows(spec, name.rpartition(".")[2])
    if info.shape[0] != need:
        raise ModelFormatError(
            f"{where}: tensor {stored!r} has {info.shape[0]} rows, but the header's sizes need {need} "
            f"({' + '.join(FUSED[name.rpartition('.')[2]])}); the weights do not match the header: re-convert or "
            "re-download the model"
        )



class FusedParts:
    """Mixed into a reader: q/k/v and gate/up served as row views of stored `qkv` / `gate_up` tensors.

    The reader supplies `_raw_names()`, `_raw_info(name)` and `_raw_get(name)` over its stored
    canonical names, and calls `_split_fused(where, stored_name)` once its spec is known.
    """

    _parts: dict[str, tuple[str, int, int]] = {}
    # a reader whose tensors are fresh copies (not views of a map) copies each part, so that a part
    # held on its own does not keep the whole fused tensor alive
    _copy_parts = False

    def _split_fused(self, where: str, stored_name) -> None:
        fused = [n for n in self._raw_names() if n.rpartition(".")[2] in FUSED]
        for name in fused:
            check_fused_rows(self._raw_info(name), name, stored_name(name), self.spec, where)
        self._parts = split_names(fused, self.spec)

    def names(self) -> list[str]:
        fused = {f for f, _, _ in self._parts.values()}
        return [n for n in self._raw_names() if n not in fused] + list(self._parts)

    def info(self, name: str) -> TensorInfo:
        if name in self._parts:
            fused, start, stop = self._parts[name]
            return rows_info(self._raw_info(fused), start, stop)
        return self._raw_info(name)

    def nbytes(self, name: str) -> int:
        return self.info(name).nbytes

    def get(self, name: str):
        if name in self._parts:
            fused, start, stop = self._parts[name]
            part = rows_of(self._raw_get(fused), start, stop)
            return _copied(part) if self._copy_parts else part
        return self._raw_get(name)


def _copied(weight):
    if isinstance(weight, GPTQWeight):
        return replace(weight, qweight=weight.qweight.clone(), qzeros=weight.qzeros.clone(), scales=weight.scales.clone())
    if isinstance(weight, PackedTensor):
        return PackedTensor(weight.qtype, weight.data.clone(), weight.shape)
    return weight.clone()
