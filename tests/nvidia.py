"""Whether this machine has an NVIDIA driver: GPU tests need one, no-driver tests its absence."""

from __future__ import annotations

from jupyter_dist.gpus import NvmlUnavailableError, list_gpus


def has_nvidia_driver() -> bool:
    """True where NVML starts (it reads the driver only, and creates no CUDA context)."""
    try:
        list_gpus()
    except NvmlUnavailableError:
        return False
    return True
