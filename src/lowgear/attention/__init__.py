"""The attention ladder: flash_attn → xformers → sdpa → triton → eager, chosen per device by probing.

Importing this package imports no kernel library; each rung imports its own when it is probed.
"""

from .base import AttentionBackend, Capabilities, ProbeResult
from .metadata import StepMetadata, build_metadata
from .select import LADDER, Decision, Selection, get_backend, select_backend

__all__ = [
    "LADDER",
    "AttentionBackend",
    "Capabilities",
    "Decision",
    "ProbeResult",
    "Selection",
    "StepMetadata",
    "build_metadata",
    "get_backend",
    "select_backend",
]
