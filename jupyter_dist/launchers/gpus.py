"""Decide which GPUs each engine gets, before anything starts.

``--gpus all`` (every visible GPU), ``--gpus 2`` (a count: the first two),
``--gpus 0,3`` (indices, as CUDA numbers the GPUs this process sees) and
``--gpus-per-engine 2`` become one ``CUDA_VISIBLE_DEVICES`` value per engine,
written with UUIDs: CUDA's own order can differ from NVML's (CUDA puts the
fastest device first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``), a UUID names
one device in both. The engine gets it in its environment before its first
line runs, so its GPUs are its ``cuda:0``, ``cuda:1``...
"""

from __future__ import annotations

from collections.abc import Sequence

from jupyter_dist.errors import LauncherError
from jupyter_dist.gpus import GpuInfo, NvmlUnavailableError, list_gpus

GpuSelection = str | int | Sequence[int]


def machine_gpus() -> list[GpuInfo]:
    """The GPUs this process sees; ``LauncherError`` where there is no NVIDIA driver."""
    try:
        return list_gpus()
    except NvmlUnavailableError as e:
        raise LauncherError(
            f"GPU engines need an NVIDIA GPU and its driver, but {e}. "
            "Start without --gpus for CPU engines."
        ) from e


def _describe(available: list[GpuInfo]) -> str:
    if not available:
        return "This machine shows no GPU to this process (is CUDA_VISIBLE_DEVICES empty?)."
    listed = "; ".join(f"{g.index}: {g.name} ({g.uuid})" for g in available)
    return f"This machine has {len(available)} GPU(s): {listed}."


def _selected(gpus: GpuSelection, available: list[GpuInfo]) -> list[GpuInfo]:
    if not available:
        raise LauncherError(f"Asked for GPU engines. {_describe(available)}")
    if isinstance(gpus, str):
        text = gpus.strip().lower()
        if text == "all":
            return list(available)
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts or not all(p.isdigit() for p in parts):
            raise LauncherError(
                f"--gpus takes 'all', a count such as 2, or GPU indices such as 0,3; not {gpus!r}."
            )
        gpus = int(parts[0]) if "," not in text else [int(p) for p in parts]
    if isinstance(gpus, bool):
        raise LauncherError(f"--gpus takes 'all', a count or indices, not {gpus!r}.")
    if isinstance(gpus, int):
        if gpus < 1 or gpus > len(available):
            raise LauncherError(f"Asked for {gpus} GPU(s). {_describe(available)}")
        return available[:gpus]
    indices = list(gpus)
    missing = [i for i in indices if not 0 <= i < len(available)]
    if missing or not indices:
        raise LauncherError(f"There is no GPU {missing or indices}. {_describe(available)}")
    if len(set(indices)) != len(indices):
        raise LauncherError(f"GPU indices {indices} name a GPU twice; name each once.")
    return [available[i] for i in indices]


def plan_engine_gpus(
    gpus: GpuSelection | None,
    gpus_per_engine: int | None,
    n: int | None,
    available: list[GpuInfo] | None = None,
) -> list[str] | None:
    """One ``CUDA_VISIBLE_DEVICES`` value per engine, or None when no GPU was asked for.

    Without ``n``, as many engines as the selected GPUs make; with it, the first
    ``n * gpus_per_engine`` of them. ``available`` defaults to this machine's GPUs.
    """
    if gpus is None and gpus_per_engine is None:
        return None
    per_engine = 1 if gpus_per_engine is None else gpus_per_engine
    if isinstance(per_engine, bool) or not isinstance(per_engine, int) or per_engine < 1:
        raise LauncherError(f"--gpus-per-engine must be 1 or more, not {gpus_per_engine!r}.")
    if available is None:
        available = machine_gpus()
    selected = _selected("all" if gpus is None else gpus, available)
    if n is None:
        if len(selected) % per_engine:
            raise LauncherError(
                f"{len(selected)} GPU(s) do not split into engines of {per_engine} each; "
                f"choose --gpus as a multiple of {per_engine}, or give -n."
            )
        n = len(selected) // per_engine
    elif n * per_engine > len(selected):
        raise LauncherError(
            f"{n} engine(s) with {per_engine} GPU(s) each need {n * per_engine} GPUs, "
            f"but {len(selected)} were selected. {_describe(available)}"
        )
    return [
        ",".join(g.uuid for g in selected[k * per_engine : (k + 1) * per_engine]) for k in range(n)
    ]
