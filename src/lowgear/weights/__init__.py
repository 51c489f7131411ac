"""Model weights: `open_weights(path)` picks the reader for a .gguf file or a Hugging Face folder.

Readers produce a `ModelSpec` and a `WeightSource` (see spec.py); nothing outside this package
knows which file format a model came from.
"""

from __future__ import annotations

import os

from ..errors import ModelFormatError
from .gguf import GGUFSource, check_gguf_magic
from .hf import HFSource
from .spec import SUPPORTED_ARCHITECTURES, ModelSpec, PackedTensor, TensorInfo, WeightSource


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
    "SUPPORTED_ARCHITECTURES",
    "GGUFSource",
    "HFSource",
    "ModelSpec",
    "PackedTensor",
    "TensorInfo",
    "WeightSource",
    "open_weights",
]
