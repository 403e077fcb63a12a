"""Sample what an engine process uses: CPU, memory and its GPUs, for the heartbeat."""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

from jupyter_dist import shm
from jupyter_dist.gpus import GpuProbe, NvmlGpuProbe

RSS_GRANULE_NBYTES = 64 * 1024
# Linux: the resident size, in pages, is the second field.
STATM_PATH = "/proc/self/statm"


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class MetricsSampler:
    """Builds the ``metrics`` dict an engine's heartbeat carries; called on the I/O thread.

    ``cpu_percent`` is measured since the previous sample (or since the
    sampler was made). Values are rounded so a steady engine sends the same
    metrics again and the controller has nothing new to publish.

    An idle engine samples at every beat, right after waking with cold
    caches: opening ``/proc`` files there (as psutil does, twice) cost about
    0.5 ms of CPU a beat. So the CPU time comes from ``os.times()`` and the
    resident size from ``statm``, opened once; psutil only where there is no
    ``/proc``.
    """

    def __init__(self, gpus: GpuProbe | None = None) -> None:
        self.pid = os.getpid()
        self.gpus: GpuProbe = NvmlGpuProbe() if gpus is None else gpus
        self._page_nbytes = os.sysconf("SC_PAGE_SIZE")
        try:
            self._statm: int | None = os.open(STATM_PATH, os.O_RDONLY)
        except OSError:
            self._statm = None
        self._last_cpu_s = _cpu_seconds()
        self._last_wall_s = time.monotonic()

    def rss_bytes(self) -> int:
        """This engine's resident memory: a few microseconds, so it can be watched closely."""
        if self._statm is None:
            rss_bytes = int(psutil.Process(self.pid).memory_info().rss)
        else:
            rss_bytes = int(os.pread(self._statm, 128, 0).split()[1]) * self._page_nbytes
        # Segments kept mapped for the next transfer belong to the pool, not to this engine.
        return max(0, rss_bytes - shm.kept_unused_nbytes())

    def sample(self) -> dict[str, Any]:
        cpu_s, wall_s = _cpu_seconds(), time.monotonic()
        elapsed_s = wall_s - self._last_wall_s
        cpu_percent = round(100 * (cpu_s - self._last_cpu_s) / elapsed_s) if elapsed_s > 0 else 0
        self._last_cpu_s, self._last_wall_s = cpu_s, wall_s
        rss_bytes = self.rss_bytes()
        return {
            "cpu_percent": cpu_percent,
            # To 64 KiB: an idle engine's RSS moves by a page or two now and then, and
            # each move made the controller publish the whole state again.
            "rss_bytes": rss_bytes - rss_bytes % RSS_GRANULE_NBYTES,
            "gpus": self.gpus.sample(self.pid),
        }

    def close(self) -> None:
        if self._statm is not None:
            os.close(self._statm)
            self._statm = None
        self.gpus.close()
