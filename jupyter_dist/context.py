"""Where engine code runs: ``jd.engine_context()``.

Code on an engine (a cell, an applied function, a task, an actor method)
needs to know which engine it is to shard data, seed, or set up a torch
group. The engine process sets the record when it registers and replaces
it when the cluster changes (engines join or die, a torch group forms); a
record is frozen, so code that keeps one sees a consistent picture.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from jupyter_dist.errors import JupyterDistError
from jupyter_dist.gpus import GpuInfo


@dataclass(frozen=True, slots=True)
class EngineContext:
    """This engine: its id, the cluster's size, its host, process and GPUs, its torch ranks.

    ``rank``, ``world_size``, ``local_rank`` and ``local_world_size`` are None
    until a torch group is formed (``c.torch()``, ``%%distributed --torch``).
    """

    engine_id: int
    n_engines: int  # live engines in the cluster now
    host: str
    pid: int
    gpus: tuple[GpuInfo, ...]  # the GPUs this engine may use, as CUDA numbers them here
    rank: int | None = None
    world_size: int | None = None
    local_rank: int | None = None
    local_world_size: int | None = None


_current: EngineContext | None = None


def engine_context() -> EngineContext:
    """The context of the engine this code runs on.

    Raises ``JupyterDistError`` outside an engine (in the notebook, say),
    where there is no engine to describe.

    Examples
    --------
    >>> ctx = jd.engine_context()  # in a %%distributed cell
    >>> shard = data[ctx.engine_id :: ctx.n_engines]
    """
    if _current is None:
        raise JupyterDistError(
            "jd.engine_context() only means something on an engine: call it in a "
            "%%distributed cell, a function given to apply/submit/map, or an actor method."
        )
    return _current


def set_engine_context(context: EngineContext) -> None:
    """Make ``context`` this process's engine context (the engine, on registering)."""
    global _current
    _current = context


def update_engine_context(**changes: Any) -> EngineContext:
    """Replace some fields of this engine's context (a new cluster size, torch ranks)."""
    context = engine_context()
    updated = dataclasses.replace(context, **changes)
    set_engine_context(updated)
    return updated
