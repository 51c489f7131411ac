"""Shared fixtures. Triton runs in its interpreter on machines without CUDA (set before any import)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CPU models are float32 references: packed layers unpacked to float32, not held for the int4 kernel (whose
# bfloat16 activations tests/test_cpu_int4.py checks on its own, with cpu_weights set explicitly)
os.environ.setdefault("LOWGEAR_CPU_WEIGHTS", "unpacked")
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    import lowgear

    return lowgear.default_model_path()
