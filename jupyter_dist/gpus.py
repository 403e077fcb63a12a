"""Sample the GPUs this engine can see through NVML, matched by UUID.

NVML numbers every GPU on the host and ignores ``CUDA_VISIBLE_DEVICES``,
which is why dashboards that ask it by index show blank or doubled charts.
The probe reads ``CUDA_VISIBLE_DEVICES`` once, resolves each entry (an
ordinal or a ``GPU-`` UUID prefix, as CUDA takes them) to a UUID, and
samples those devices only, reporting them with the index CUDA gives them
in this process. NVML (``pynvml`` from ``nvidia-ml-py``) is imported and
initialised on the first sample, never at import. Where there is no driver
or no library the probe reports no GPUs and says so once, at DEBUG.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol, TypedDict

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """A GPU as a process sees it: its CUDA ordinal there, its UUID and its name."""

    index: int
    uuid: str
    name: str


class NvmlUnavailableError(Exception):
    """NVML cannot be used here (no ``nvidia-ml-py``, no driver); the message says which."""


class GpuSample(TypedDict):
    """One GPU as an engine reports it in its heartbeat (wire dict; ``None``: not supported)."""

    index: int  # the CUDA ordinal in this engine (position in CUDA_VISIBLE_DEVICES)
    nvml_index: int  # the host-wide NVML index
    uuid: str
    name: str
    utilization_percent: int | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    temperature_c: int | None
    power_w: float | None
    process_memory_bytes: int | None  # held by this engine's own process


class GpuProbe(Protocol):
    """What the engine's metrics need of a GPU source."""

    def sample(self, pid: int) -> list[GpuSample]:
        """The visible GPUs now; ``pid`` is the process whose own GPU memory is wanted."""
        ...

    def close(self) -> None:
        """Release the library; ``sample`` may not be called afterwards."""
        ...


def parse_visible_devices(value: str | None) -> list[str] | None:
    """Split ``CUDA_VISIBLE_DEVICES`` into entries; None means every device is visible.

    CUDA stops at the first entry it cannot use, so an empty value or ``-1``
    hides every device.
    """
    if value is None:
        return None
    entries = []
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return entries


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NvmlGpuProbe:
    """A ``GpuProbe`` over NVML; safe to construct anywhere (it loads nothing until sampled).

    Not thread-safe: the engine's I/O thread is its only caller.
    """

    def __init__(
        self, nvml: ModuleType | Any = None, environ: dict[str, str] | None = None
    ) -> None:
        self._nvml = nvml  # a pynvml-compatible module; None: import pynvml on first use
        self._environ = os.environ if environ is None else environ
        self._uuids: list[str] | None = None  # visible devices in CUDA order, once resolved
        self._is_disabled = False

    def sample(self, pid: int) -> list[GpuSample]:
        if self._is_disabled:
            return []
        if self._uuids is None:
            self._uuids = self._start()
            if not self._uuids:
                return []
        nvml = self._nvml
        samples = []
        for index, uuid in enumerate(self._uuids):
            try:
                handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
                samples.append(self._sample_device(nvml, handle, index, uuid, pid))
            except nvml.NVMLError as e:  # the GPU fell off the bus, or the driver went away
                logger.warning("cannot read GPU %s (%s): %s", index, uuid, e)
        return samples

    def close(self) -> None:
        if self._uuids is not None and not self._is_disabled:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as e:
                logger.debug("nvmlShutdown failed: %s", e)
        self._is_disabled = True

    def _start(self) -> list[str]:
        """Load and initialise NVML; return the visible devices' UUIDs ([] disables the probe)."""
        try:
            self._nvml = open_nvml(self._nvml)
        except NvmlUnavailableError as e:  # an ordinary CPU machine
            logger.debug("%s; reporting no GPUs", e)
            self._is_disabled = True
            return []
        nvml = self._nvml
        try:
            uuids = [gpu.uuid for gpu in visible_gpus(nvml, self._environ)]
        except nvml.NVMLError as e:
            logger.warning("cannot list the GPUs through NVML: %s", e)
            uuids = []
        if not uuids:
            nvml.nvmlShutdown()
            self._is_disabled = True
        else:
            logger.info("sampling GPUs %s", ", ".join(uuids))
        return uuids

    def _sample_device(self, nvml: Any, handle: Any, index: int, uuid: str, pid: int) -> GpuSample:
        def read(fn: Any, *args: Any) -> Any:
            try:
                return fn(handle, *args)
            except nvml.NVMLError_NotSupported:
                return None

        memory = read(nvml.nvmlDeviceGetMemoryInfo)
        rates = read(nvml.nvmlDeviceGetUtilizationRates)
        power_mw = read(nvml.nvmlDeviceGetPowerUsage)
        processes = read(nvml.nvmlDeviceGetComputeRunningProcesses)
        own = None
        if processes is not None:
            own = sum(p.usedGpuMemory or 0 for p in processes if p.pid == pid)
        return GpuSample(
            index=index,
            nvml_index=int(nvml.nvmlDeviceGetIndex(handle)),
            uuid=uuid,
            name=_text(nvml.nvmlDeviceGetName(handle)),
            utilization_percent=None if rates is None else int(rates.gpu),
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_total_bytes=None if memory is None else int(memory.total),
            temperature_c=read(nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU),
            power_w=None if power_mw is None else power_mw / 1000.0,
            process_memory_bytes=own,
        )


def open_nvml(nvml: ModuleType | Any = None) -> Any:
    """Import (unless given) and initialise NVML; raise ``NvmlUnavailableError`` saying why not.

    NVML reads the driver only: it never creates a CUDA context, so any process may call this.
    """
    if nvml is None:
        try:
            import pynvml
        except ImportError as e:
            raise NvmlUnavailableError("nvidia-ml-py is not installed") from e
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as e:
        raise NvmlUnavailableError(f"this machine has no NVIDIA driver (NVML: {e})") from e
    return nvml


def visible_gpus(nvml: Any, environ: dict[str, str] | os._Environ[str]) -> list[GpuInfo]:
    """The GPUs a process with ``environ`` may use, in CUDA's order (NVML initialised)."""
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    by_index = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
    names = {
        uuid: _text(nvml.nvmlDeviceGetName(h)) for uuid, h in zip(by_index, handles, strict=True)
    }
    entries = parse_visible_devices(environ.get("CUDA_VISIBLE_DEVICES"))
    if entries is None:
        visible = by_index
    else:
        visible = []
        for entry in entries:
            if entry.isdigit():
                found = [by_index[int(entry)]] if int(entry) < len(by_index) else []
            else:  # a UUID or a unique prefix of one, as CUDA accepts
                found = [u for u in by_index if u.startswith(entry)]
            if len(found) != 1 or found[0] in visible:
                logger.debug(
                    "CUDA_VISIBLE_DEVICES entry %r matches no single GPU; ends there", entry
                )
                break  # CUDA ignores the entry that fails and every one after it
            visible.append(found[0])
    return [GpuInfo(index, uuid, names[uuid]) for index, uuid in enumerate(visible)]


def list_gpus(
    nvml: ModuleType | Any = None, environ: dict[str, str] | None = None
) -> list[GpuInfo]:
    """The GPUs this process may use; raises ``NvmlUnavailableError`` where NVML cannot tell."""
    nvml = open_nvml(nvml)
    try:
        return visible_gpus(nvml, os.environ if environ is None else environ)
    finally:
        nvml.nvmlShutdown()
