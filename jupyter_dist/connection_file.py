"""Write, find and read cluster connection files in the Jupyter runtime directory.

A connection file (JSON, mode 0600) holds what a client needs to reach a
cluster: its id, addresses, the signing key, the controller's public Curve
key (when it listens beyond loopback) and the controller's pid and host. Files whose controller is gone are removed when clusters are listed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from jupyter_core.paths import jupyter_runtime_dir

from jupyter_dist.errors import ClusterError, ConnectionFileError
from jupyter_dist.private_file import write_atomically

logger = logging.getLogger(__name__)

PREFIX = "jupyter-dist-"


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """Everything in a connection file."""

    cluster_id: str
    key: str
    ip: str
    client_port: int
    engine_port: int
    pub_port: int
    controller_pid: int
    host: str
    created: float
    curve_public_key: str = ""  # the controller's CurveZMQ key when it listens beyond loopback

    def url(self, port: int) -> str:
        return f"tcp://{self.ip}:{port}"


def runtime_dir() -> Path:
    """The Jupyter runtime directory (``JUPYTER_RUNTIME_DIR`` wins), created if missing."""
    path = Path(jupyter_runtime_dir())
    path.mkdir(parents=True, exist_ok=True)
    return path


def path_for(cluster_id: str) -> Path:
    return runtime_dir() / f"{PREFIX}{cluster_id}.json"


def write(info: ClusterInfo) -> Path:
    """Write the connection file, whole in one step, with mode 0600 (readable by its owner only)."""
    path = path_for(info.cluster_id)
    write_atomically(path, json.dumps(asdict(info), indent=1))
    return path


def read(path: str | os.PathLike[str]) -> ClusterInfo:
    """Read a connection file; raise ConnectionFileError naming what is wrong."""
    path = str(path)
    try:
        with open(path) as f:
            fields = json.load(f)
    except FileNotFoundError as e:
        raise ConnectionFileError(path, "it does not exist") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ConnectionFileError(path, f"it cannot be read as JSON ({e})") from e
    try:
        return ClusterInfo(**fields)
    except TypeError as e:
        raise ConnectionFileError(path, f"it is not a jupyter-dist connection file ({e})") from e


def is_alive(info: ClusterInfo) -> bool:
    """Whether the controller still runs (only checkable on its own host; elsewhere assume so).

    A killed controller whose parent (the kernel that started it) has not
    reaped it yet is a zombie: its pid exists, but nothing answers there.
    """
    if info.host != socket.gethostname():
        return True
    try:
        status = psutil.Process(info.controller_pid).status()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    return bool(status != psutil.STATUS_ZOMBIE)


def list_running() -> list[tuple[Path, ClusterInfo]]:
    """The running clusters, newest first; stale and unreadable files are removed."""
    found: list[tuple[Path, ClusterInfo]] = []
    for path in runtime_dir().glob(f"{PREFIX}*.json"):
        try:
            info = read(path)
        except ConnectionFileError as e:
            logger.warning("ignoring %s", e)
            continue
        if not is_alive(info):
            logger.info(
                "removing stale connection file %s (controller %d is gone)",
                path,
                info.controller_pid,
            )
            path.unlink(missing_ok=True)
            continue
        found.append((path, info))
    found.sort(key=lambda item: item[1].created, reverse=True)
    return found


def find(cluster: str | os.PathLike[str] | None) -> tuple[Path, ClusterInfo]:
    """Resolve a cluster id, a connection file path, or None (the newest running cluster)."""
    if cluster is None:
        running = list_running()
        if not running:
            raise ClusterError(
                f"No running cluster was found in {runtime_dir()}. "
                "Start one with `%dist start -n 4` or `jd.Cluster.start(n=4)`."
            )
        return running[0]
    text = str(cluster)
    if text.endswith(".json") or os.sep in text:
        return Path(text), read(text)
    path = path_for(text)
    if not path.exists():
        ids = ", ".join(repr(info.cluster_id) for _, info in list_running()) or "none"
        raise ClusterError(
            f"No cluster with id {text!r} is running (running: {ids}). "
            "`jupyter-dist list` shows them."
        )
    return path, read(path)
