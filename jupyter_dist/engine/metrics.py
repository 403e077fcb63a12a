"""Sample what an engine process uses: CPU, memory and its GPUs, for the heartbeat."""

from __future__ import annotations

import os
from typing import Any

import psutil

from jupyter_dist import shm
from jupyter_dist.engine.gpus import GpuProbe, NvmlGpuProbe

RSS_GRANULE_NBYTES = 64 * 1024


class MetricsSampler:
    """Builds the ``metrics`` dict an engine's heartbeat carries; called on the I/O thread.

    ``cpu_percent`` is measured since the previous sample (psutil's
    interval-free mode), so the first one reads 0. Values are rounded so a
    steady engine sends the same metrics again and the controller has
    nothing new to publish.
    """

    def __init__(self, gpus: GpuProbe | None = None) -> None:
        self.pid = os.getpid()  # this process: its kept segments are left out of its memory
        self.process = psutil.Process(self.pid)
        self.gpus: GpuProbe = NvmlGpuProbe() if gpus is None else gpus

    def sample(self) -> dict[str, Any]:
        with self.process.oneshot():
            cpu_percent = round(self.process.cpu_percent(None))
            rss_bytes = self.process.memory_info().rss
        # Segments kept mapped for the next transfer belong to the pool, not to this engine.
        rss_bytes = max(0, rss_bytes - shm.kept_unused_nbytes())
        return {
            "cpu_percent": cpu_percent,
            # To 64 KiB: an idle engine's RSS moves by a page or two now and then, and
            # each move made the controller publish the whole state again.
            "rss_bytes": rss_bytes - rss_bytes % RSS_GRANULE_NBYTES,
            "gpus": self.gpus.sample(self.pid),
        }

    def close(self) -> None:
        self.gpus.close()
