"""Device facts: the only module that reads torch.cuda, NVML and CUDA_* environment variables.

(Skeleton: the hardware helper owns and expands this file.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceInfo:
    index: int  # CUDA index (as torch numbers it), -1 for the CPU
    kind: str  # "cpu" or "cuda"
    name: str
    compute_capability: tuple[int, int] | None = None
    total_memory: int = 0  # bytes
    free_memory: int = 0  # bytes
    uuid: str | None = None
    pci_bus_id: str | None = None
    bandwidth: float | None = None  # bytes/s, datasheet
    fp16_flops: float | None = None  # dense fp16 tensor-core peak, FLOP/s
    sm_count: int | None = None
    simulated: bool = False  # a simulated profile: nothing can run on it

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cpu") if self.kind == "cpu" else torch.device("cuda", self.index)

    @property
    def label(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def cpu_device() -> DeviceInfo:
    return DeviceInfo(index=-1, kind="cpu", name="CPU")
