"""Weight formats: readers, packed tensor types and their torch reference dequantization.

`open_weights(path)` picks the reader for a .gguf file (gguf.py) or a Hugging Face folder (hf.py);
readers produce a `ModelSpec` and a `WeightSource` (spec.py), so nothing outside this package knows
which file a model came from. Packed weights stay packed: GGUF block formats (blocks.py, unpacked
in torch by dequant.py), GPTQ (gptq.py) and EXL2 (exl2.py) tensors. Kernels that read them on the
GPU live in `lowgear.ops.matmul`; this package imports no kernel library.
"""

from __future__ import annotations

import os

from ..errors import ModelFormatError
from .gguf import GGUFSource, check_gguf_magic
from .hf import HFSource
from .spec import SUPPORTED_ARCHITECTURES, ModelSpec, PackedTensor, TensorInfo, WeightSource
from .blocks import FLOAT_TYPES, QUANT_FORMATS, SUPPORTED_TYPES, QuantFormat, get_format, is_quantized
from .dequant import dequantize, dequantize_data, dequantize_index, dequantize_rows


def open_weights(path: str | os.PathLike) -> WeightSource:
    """A .gguf file -> GGUFSource; a folder with config.json and *.safetensors -> HFSource."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFormatError(f"model path {path!r} does not exist: give a .gguf file or a Hugging Face model folder")
    if os.path.isdir(path):
        ggufs = [f for f in sorted(os.listdir(path)) if f.endswith(".gguf")]
        if not os.path.isfile(os.path.join(path, "config.json")) and ggufs:
            raise ModelFormatError(
                f"{path} is a folder of GGUF files, not a Hugging Face model folder: pass the file itself, "
                f"e.g. {os.path.join(path, ggufs[0])}"
            )
        return HFSource(path)
    if path.endswith(".safetensors"):
        raise ModelFormatError(
            f"{path} is a safetensors file: pass the folder that holds it together with config.json"
        )
    check_gguf_magic(path)
    return GGUFSource(path)


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
    "SUPPORTED_ARCHITECTURES",
    "GGUFSource",
    "HFSource",
    "ModelSpec",
    "PackedTensor",
    "TensorInfo",
    "WeightSource",
    "open_weights",
]
