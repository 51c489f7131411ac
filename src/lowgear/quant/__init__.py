"""Packed low-bit weights: format facts (formats.py) and torch unpacking (dequant.py)."""

from .dequant import dequantize, dequantize_data, dequantize_index, dequantize_rows
from .formats import FLOAT_TYPES, QUANT_FORMATS, SUPPORTED_TYPES, QuantFormat, get_format, is_quantized

__all__ = [
    "FLOAT_TYPES",
    "QUANT_FORMATS",
    "SUPPORTED_TYPES",
    "QuantFormat",
    "dequantize",
    "dequantize_data",
    "dequantize_index",
    "dequantize_rows",
    "get_format",
    "is_quantized",
]
