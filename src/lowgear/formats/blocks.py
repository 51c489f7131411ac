"""The packed weight formats lowgear reads, and the facts about each one.

A packed row of `cols` weights is `cols / block_size` blocks of `block_bytes` bytes each, in
llama.cpp's (GGUF's) block layout. This file is the one table of those facts: block sizes, byte
counts, and which formats lowgear can unpack. The unpacking itself lives in `formats/dequant.py`;
GPU kernels (in `ops/matmul/`) read the same layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedError

FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class QuantFormat:
    name: str
    block_size: int  # weights per block
    block_bytes: int  # bytes per block
    description: str

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_size

    def row_bytes(self, cols: int) -> int:
        """Bytes of one packed row of `cols` weights (cols must be a whole number of blocks)."""
        if cols % self.block_size:
            raise UnsupportedError(
                f"{self.name} packs rows in blocks of {self.block_size} weights, but a row has {cols}: "
                f"this tensor cannot be stored as {self.name}; use F16 or a format with smaller blocks"
            )
        return cols // self.block_size * self.block_bytes


QUANT_FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in (
        QuantFormat("Q8_0", 32, 34, "f16 scale d, 32 int8 q; w = d*q"),
        QuantFormat("Q4_0", 32, 18, "f16 scale d, 16 bytes of 4-bit q (low nibbles: weights 0-15, high: 16-31); w = d*(q-8)"),
        QuantFormat("Q4_1", 32, 20, "f16 scale d, f16 min m, 16 bytes of 4-bit q; w = d*q + m"),
        QuantFormat("Q5_0", 32, 22, "f16 scale d, 32-bit fifth bits qh, 16 bytes of low nibbles; w = d*(q-16)"),
        QuantFormat("Q5_1", 32, 24, "f16 scale d, f16 min m, 32-bit fifth bits qh, 16 bytes of low nibbles; w = d*q + m"),
        QuantFormat(
            "Q2_K", 256, 84,
            "16 bytes of 4-bit scale (low) and min (high) per 16 weights, 64 bytes of 2-bit q, f16 d, f16 dmin; "
            "w = d*sc*q - dmin*m",
        ),
        QuantFormat(
            "Q3_K", 256, 110,
            "32 bytes hmask (each weight's third bit), 64 bytes of 2-bit low q, 12 bytes of 6-bit scales (one per "
            "16 weights), f16 d; w = d*(sc-32)*(q - 4 if the hmask bit is 0)",
        ),
        QuantFormat(
            "Q4_K", 256, 144,
            "super-block of 8x32: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit q; "
            "w = d*sc*q - dmin*m",
        ),
        QuantFormat(
            "Q5_K", 256, 176,
            "as Q4_K plus 32 bytes qh holding each weight's fifth bit; w = d*sc*q - dmin*m",
        ),
        QuantFormat(
            "Q6_K", 256, 210,
            "128 bytes low nibbles ql, 64 bytes 2-bit highs qh, 16 int8 scales (one per 16 weights), f16 d at the end; "
            "w = d*sc*(q-32)",
        ),
        QuantFormat(
            "IQ4_NL", 32, 18,
            "f16 d, 16 bytes of 4-bit indices into a fixed 16-entry non-linear table (low nibbles: weights 0-15); "
            "w = d*table[i]",
        ),
        QuantFormat(
            "IQ4_XS", 256, 136,
            "f16 d, 16-bit high and 4 bytes low parts of 6-bit scales (one per 32 weights), 128 bytes of 4-bit "
            "table indices; w = d*(sc-32)*table[i]",
        ),
    )
}

SUPPORTED_TYPES = FLOAT_TYPES + tuple(QUANT_FORMATS)

# IQ4_NL's and IQ4_XS's 16 weight levels (llama.cpp's kvalues_iq4nl): a fact of the format
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def is_quantized(qtype: str) -> bool:
    return qtype in QUANT_FORMATS


def get_format(qtype: str) -> QuantFormat:
    """The format named `qtype`, or an UnsupportedError listing the ones lowgear reads."""
    fmt = QUANT_FORMATS.get(qtype)
    if fmt is None:
        raise UnsupportedError(
            f"weight type {qtype!r} is not supported: lowgear reads {', '.join(SUPPORTED_TYPES)}; "
            "re-quantize the model to one of those (e.g. with llama.cpp's llama-quantize)"
        )
    return fmt
