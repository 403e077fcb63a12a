"""Jupyter-native interactive distributed compute: engines, parallel cells and actors over ZeroMQ.

Importing this package starts nothing: no sockets, threads or processes.
The client classes load on first use, so that the controller and engine,
which import ``jupyter_dist.*`` submodules and thereby this package, never
load the client (nor, through it, tqdm, ipywidgets or IPython.display).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from jupyter_dist.context import EngineContext, engine_context
from jupyter_dist.errors import (
    ActorDiedError,
    ClusterError,
    CompositeRemoteError,
    ConnectionFileError,
    ControllerGoneError,
    DistTimeoutError,
    EngineDiedError,
    JupyterDistError,
    LauncherError,
    NoEnginesError,
    RemoteError,
    SerializationError,
)
from jupyter_dist.gpus import GpuInfo

if TYPE_CHECKING:
    from jupyter_dist.actor_handle import ActorHandle
    from jupyter_dist.client.cluster import ActorInfo, Cluster, EngineStatus, TaskInfo
    from jupyter_dist.client.view import View
    from jupyter_dist.futures import Future

__version__ = "0.1.0"

_CLIENT_EXPORTS = {
    "ActorHandle": "jupyter_dist.actor_handle",
    "ActorInfo": "jupyter_dist.client.cluster",
    "Cluster": "jupyter_dist.client.cluster",
    "EngineStatus": "jupyter_dist.client.cluster",
    "TaskInfo": "jupyter_dist.client.cluster",
    "Future": "jupyter_dist.futures",
    "View": "jupyter_dist.client.view",
}


def __getattr__(name: str) -> Any:
    module_name = _CLIENT_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'jupyter_dist' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext jupyter_dist``: the ``%dist``, ``%%distributed`` and ``%autodist`` magics."""
    from jupyter_dist.magics import load

    load(shell)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "ActorDiedError",
    "ActorHandle",
    "ActorInfo",
    "Cluster",
    "ClusterError",
    "CompositeRemoteError",
    "ConnectionFileError",
    "ControllerGoneError",
    "DistTimeoutError",
    "EngineContext",
    "EngineDiedError",
    "EngineStatus",
    "Future",
    "GpuInfo",
    "JupyterDistError",
    "LauncherError",
    "NoEnginesError",
    "RemoteError",
    "SerializationError",
    "TaskInfo",
    "View",
    "__version__",
    "engine_context",
]
