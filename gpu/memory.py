"""Device memory probes: NVML on a GPU (the truth, other processes included), the torch
CUDA allocator as fallback, and an accounted budget on CPU."""

from __future__ import annotations

import logging
from typing import Protocol

from modelpool.gpu.protocol import DeviceMemory

log = logging.getLogger(__name__)


class MemoryProbe(Protocol):
    def read(self, ours_bytes: int) -> DeviceMemory: ...


class BudgetProbe:
    """CPU: the device is the budget; what our models hold is what is used."""

    def __init__(self, device: str, budget_bytes: int) -> None:
        self.device = device
        self.budget_bytes = budget_bytes

    def read(self, ours_bytes: int) -> DeviceMemory:
        return DeviceMemory(
            device=self.device,
            total_bytes=self.budget_bytes,
            used_bytes=ours_bytes,
            free_bytes=max(0, self.budget_bytes - ours_bytes),
            ours_bytes=ours_bytes,
            source="budget",
        )


class NvmlProbe:
    """Real device memory through nvidia-ml-py. ``budget_bytes`` (optional) caps what
    modelpool may use below the physical total."""

    def __init__(self, device: str, index: int, budget_bytes: int | None = None) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.device = device
        self.budget_bytes = budget_bytes

    def read(self, ours_bytes: int) -> DeviceMemory:
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        return DeviceMemory(
            device=self.device,
            total_bytes=int(info.total),
            used_bytes=int(info.used),
            free_bytes=int(info.free),
            ours_bytes=ours_bytes,
            source="nvml",
            budget_bytes=self.budget_bytes,
        )


class TorchCudaProbe:
    """Fallback when NVML cannot be initialised (some containers hide it)."""

    def __init__(self, device: str, index: int, budget_bytes: int | None = None) -> None:
        self.device = device
        self.index = index
        self.budget_bytes = budget_bytes

    def read(self, ours_bytes: int) -> DeviceMemory:
        import torch

        free, total = torch.cuda.mem_get_info(self.index)
        return DeviceMemory(
            device=self.device,
            total_bytes=int(total),
            used_bytes=int(total - free),
            free_bytes=int(free),
            ours_bytes=ours_bytes,
            source="torch",
            budget_bytes=self.budget_bytes,
        )


def probe_for(device: str, budget_bytes: int | None) -> MemoryProbe:
    """The best probe for ``device`` ('cpu' or 'cuda:N')."""
    if device == "cpu":
        if budget_bytes is None:
            raise ValueError("a CPU worker needs --device-memory-budget")
        return BudgetProbe(device, budget_bytes)
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    try:
        return NvmlProbe(device, index, budget_bytes)
    except Exception as e:  # pynvml raises its own NVMLError family, or ImportError
        log.warning("NVML unavailable on %s (%s); using torch.cuda.mem_get_info", device, e)
        return TorchCudaProbe(device, index, budget_bytes)
