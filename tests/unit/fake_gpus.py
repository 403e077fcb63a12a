"""Stand-ins for what this machine lacks: an NVIDIA driver (``FakeNvml``) and GPUs (``FakeGpuProbe``).

``FakeNvml`` answers the few ``pynvml`` calls ``NvmlGpuProbe`` makes, with
the same shapes (named tuples with the same attributes, errors of the same
names), so the probe's own logic runs unchanged. Tests only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from jupyter_dist.gpus import GpuSample


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):  # pynvml names it so
    pass


class NVMLError_LibraryNotFound(NVMLError):  # pynvml names it so
    pass


@dataclass
class FakeDevice:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    utilization_percent: int = 0
    memory_used_bytes: int = 0
    memory_total_bytes: int = 80 * 2**30
    temperature_c: int = 40
    power_mw: int | None = 70_000  # None: the board does not report power
    processes: dict[int, int] = field(default_factory=dict)  # pid -> bytes held


class FakeNvml:
    """A ``pynvml`` with the devices given; ``is_missing`` plays a machine without a driver."""

    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, devices: list[FakeDevice], is_missing: bool = False) -> None:
        self.devices = devices
        self.is_missing = is_missing
        self.is_initialised = False
        self.calls: list[str] = []

    def _device(self, handle: int) -> FakeDevice:
        if not self.is_initialised:
            raise NVMLError("Uninitialized")
        return self.devices[handle]

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.is_missing:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
        self.is_initialised = True

    def nvmlShutdown(self) -> None:
        self.calls.append("nvmlShutdown")
        self.is_initialised = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._device(index)
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        for handle, device in enumerate(self.devices):
            if device.uuid == uuid:
                return handle
        raise NVMLError("Not Found")

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return self._device(handle).uuid.encode()  # older pynvml returns bytes

    def nvmlDeviceGetIndex(self, handle: int) -> int:
        return handle

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self._device(handle).name

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        device = self._device(handle)
        return SimpleNamespace(
            used=device.memory_used_bytes,
            total=device.memory_total_bytes,
            free=device.memory_total_bytes - device.memory_used_bytes,
        )

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=self._device(handle).utilization_percent, memory=0)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return self._device(handle).temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        power = self._device(handle).power_mw
        if power is None:
            raise NVMLError_NotSupported("Not Supported")
        return power

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        return [
            SimpleNamespace(pid=pid, usedGpuMemory=nbytes)
            for pid, nbytes in self._device(handle).processes.items()
        ]


class FakeGpuProbe:
    """A ``GpuProbe`` that reports the samples it is given."""

    def __init__(self, samples: list[GpuSample]) -> None:
        self.samples = samples
        self.is_closed = False

    def sample(self, pid: int) -> list[GpuSample]:
        return list(self.samples)

    def close(self) -> None:
        self.is_closed = True
