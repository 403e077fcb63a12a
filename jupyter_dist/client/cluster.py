"""``Cluster``: start or connect to a cluster; the view over all of its engines.

A thin facade: views do the work, ``Connection`` does the I/O, launchers
start processes. Blocking waits here forward a Ctrl-C to the engines
running the awaited work.
"""

from __future__ import annotations

import concurrent.futures
import secrets
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jupyter_dist import connection_file, shm
from jupyter_dist.actor_handle import ActorHandle
from jupyter_dist.client.connection import Connection
from jupyter_dist.client.view import View
from jupyter_dist.connection_file import ClusterInfo
from jupyter_dist.errors import ClusterError, DistTimeoutError, JupyterDistError, LauncherError
from jupyter_dist.futures import Future, MultiFuture
from jupyter_dist.launchers import local
from jupyter_dist.launchers.gpus import GpuSelection, plan_engine_gpus
from jupyter_dist.protocol import MsgType
from jupyter_dist.quantities import parse_duration_s, parse_nbytes
from jupyter_dist.torch_group import DEFAULT_TIMEOUT_S, TorchGroup

if TYPE_CHECKING:
    from jupyter_dist.widgets import ClusterMonitor

START_TIMEOUT_S = 60.0
DEFAULT_ENGINES = 4
LOG_TAIL_LINES = 20


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """One engine as ``c.status()`` and ``%dist status`` show it."""

    engine_id: int
    host: str
    pid: int
    state: str
    cpu_percent: float | None
    rss_bytes: int | None
    gpus: list[dict[str, Any]] = field(default_factory=list)
    task_id: str | None = None
    queued: int = 0
    exit_code: int | None = None
    memory_limit_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class ActorInfo:
    """One living actor as ``c.actors()`` lists it."""

    actor_id: str
    class_name: str
    name: str | None
    engine_id: int
    pending: int
    calls_done: int
    restarts: int
    state: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """One recent task as ``c.history()`` lists it."""

    task_id: str
    kind: str
    engine_id: int | None
    state: str
    submitted: float
    finished: float | None


def _log_tail(path: str) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _task_ids(future: concurrent.futures.Future[Any]) -> list[str]:
    if isinstance(future, MultiFuture):
        return [i for child in future.children for i in _task_ids(child)]
    if isinstance(future, Future) and future.steps:
        return [i for step in future.steps for i in _task_ids(step)]
    return [future.id] if isinstance(future, Future) else []


class Cluster(View):
    """A running cluster: its controller and engines, and the view over all engines.

    Examples
    --------
    >>> import jupyter_dist as jd
    >>> with jd.Cluster.start(n=2) as c:
    ...     c.run("x = 21")
    ...     c.apply(lambda: x * 2)  # noqa: F821 - x lives on the engines
    [42, 42]
    """

    def __init__(self, path: str | Path, info: ClusterInfo, is_owner: bool = False) -> None:
        self.id = info.cluster_id
        self.connection_file = str(path)
        self.connection = Connection(info)
        self._is_owner = is_owner
        super().__init__(self, None)
        self.status()

    def __repr__(self) -> str:
        return f"<Cluster {self.id!r}: {len(self.live_engine_ids())} engines>"

    # ---- starting and connecting -------------------------------------

    @classmethod
    def start(
        cls,
        n: int | None = None,
        ip: str = "127.0.0.1",
        timeout_s: float = START_TIMEOUT_S,
        idle_timeout: float | str | None = None,
        memory_limit: int | str | None = None,
        gpus: GpuSelection | None = None,
        gpus_per_engine: int | None = None,
        torch: bool = False,
        torch_timeout: float = DEFAULT_TIMEOUT_S,
    ) -> Cluster:
        """Start a controller and ``n`` local engines; return once all ``n`` are registered.

        The cluster runs in processes of its own and outlives this kernel:
        ``c.stop()`` ends it, ``c.close()`` only detaches.

        Parameters
        ----------
        n
            Engines to start: 4 by default, or with ``gpus`` as many as the
            GPUs make (``len(gpus) / gpus_per_engine``).
        gpus
            GPU engines: ``"all"`` (every GPU this process sees), a count
            (``2``: the first two) or indices (``[0, 3]`` or ``"0,3"``). Each
            engine gets ``gpus_per_engine`` of them (default 1) through
            ``CUDA_VISIBLE_DEVICES``, so its GPU is its ``cuda:0``.
        torch, torch_timeout
            Form a torch.distributed group over the engines once they are up
            (``c.torch(timeout=torch_timeout)``). The engines come with torch
            imported: their template imports it once (never touching CUDA).
        idle_timeout
            Seconds, or a text like ``"30m"`` or ``"2h"``: the cluster stops
            itself (engines, shared memory, connection file) once it has had
            no work and no request from any client for that long, so a
            forgotten notebook does not hold the machine overnight.
        memory_limit
            Resident memory each engine may use: bytes, or a size such as
            ``"2GB"``, ``"512MB"`` or ``"1.5GiB"``. An engine that passes it is
            stopped, its task fails with an ``EngineDiedError`` saying how much it
            used, and a fresh engine takes its id; the other engines go on.

        Raises
        ------
        ValueError
            ``n`` is negative or ``memory_limit`` is not a size.
        LauncherError
            The controller or an engine did not start (the message holds its
            log), or ``gpus`` asks for GPUs this machine does not have.

        Examples
        --------
        >>> c = jd.Cluster.start(n=4, memory_limit="2GB")
        >>> c = jd.Cluster.start(gpus="all", torch=True)
        """
        if n is not None and n < 0:
            raise ValueError(f"n must be 0 or more engines, not {n}")
        engine_gpus = plan_engine_gpus(gpus, gpus_per_engine, n)
        if engine_gpus is not None:
            n = len(engine_gpus)
        elif n is None:
            n = DEFAULT_ENGINES
        idle_timeout_s = parse_duration_s(idle_timeout) if idle_timeout is not None else None
        memory_limit_bytes = parse_nbytes(memory_limit) if memory_limit is not None else None
        cluster_id = secrets.token_hex(4)
        process = local.start_controller(
            cluster_id,
            n,
            ip,
            connection_file.runtime_dir(),
            idle_timeout_s=idle_timeout_s,
            memory_limit_bytes=memory_limit_bytes,
            engine_gpus=engine_gpus,
            preload=("torch",) if torch else (),
        )
        path = connection_file.path_for(cluster_id)
        deadline = time.monotonic() + timeout_s
        while True:
            if path.exists():  # written whole, in one step
                info = connection_file.read(path)
                break
            if process.poll() is not None:
                raise LauncherError(
                    f"The controller of cluster {cluster_id!r} exited with code {process.returncode} "
                    f"before it was ready. Its log ({process.log_path}) ends with:\n{_log_tail(process.log_path)}"
                )
            if time.monotonic() > deadline:
                process.kill()
                raise LauncherError(
                    f"The controller of cluster {cluster_id!r} did not start within {timeout_s} s."
                )
            time.sleep(0.02)
        cluster = cls(path, info, is_owner=True)
        try:
            cluster.wait_for_engines(n, max(1.0, deadline - time.monotonic()))
            if torch:
                cluster.torch(timeout=torch_timeout)
        except JupyterDistError:
            cluster.stop()
            raise
        return cluster

    @classmethod
    def connect(cls, cluster: str | Path | None = None) -> Cluster:
        """Attach to a running cluster by id, by connection-file path, or (None) the newest one."""
        path, info = connection_file.find(cluster)
        return cls(path, info)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._is_owner:
            self.stop()
        else:
            self.close()

    def close(self) -> None:
        """Detach from the cluster; it keeps running (``Cluster.connect`` finds it again)."""
        self.connection.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the controller and every engine, then detach (a controller found gone is left so)."""
        if self.connection.is_controller_gone:
            self.connection.close()
            return
        try:
            self.connection.request(MsgType.SHUTDOWN_REQUEST, {}, timeout_s)
        finally:
            self.connection.close()
        process_gone = time.monotonic() + timeout_s
        while connection_file.path_for(self.id).exists() and time.monotonic() < process_gone:
            time.sleep(0.02)
        shm.drop_unused_mappings()  # the controller removed the segments: their memory goes now

    # ---- engines -----------------------------------------------------

    @property
    def torch_group(self) -> TorchGroup | None:
        """The torch.distributed group ``c.torch()`` formed from this client, if any."""
        return self.connection.torch_group

    def live_engine_ids(self) -> list[int]:
        return list(self.connection.engine_ids)

    def __getitem__(self, key: int | slice | Sequence[int]) -> View:
        """``c[0]``: one engine; ``c[0:2]``: a slice of the engine ids; ``c[[1, 3]]``: those engines."""
        if isinstance(key, int):
            return View(self, [key], is_single=True)
        if isinstance(key, slice):
            return View(self, self.engine_ids[key])
        return View(self, [int(k) for k in key])

    def status(self) -> list[EngineStatus]:
        """One record per engine: id, host, pid, state, CPU, memory, GPUs, the task at hand."""
        reply = self.connection.request(MsgType.STATUS_REQUEST, {})
        records = [
            EngineStatus(
                engine_id=e["engine_id"],
                host=e["host"],
                pid=e["pid"],
                state=e["state"],
                cpu_percent=e.get("cpu_percent"),
                rss_bytes=e.get("rss_bytes"),
                gpus=e.get("gpus", []),
                task_id=e.get("task_id"),
                queued=e.get("queued", 0),
                exit_code=e.get("exit_code"),
                memory_limit_bytes=e.get("memory_limit_bytes"),
            )
            for e in reply.content["engines"]
        ]
        self.connection.update_state(reply.content)
        return records

    def idle_stop_in_s(self) -> float | None:
        """Seconds until the cluster stops itself for want of work (its idle timeout), as of the last status.

        None when it has no idle timeout or work is queued or running.
        """
        stop_at = self.connection.state.get("idle_stop_at")
        return None if stop_at is None else max(0.0, stop_at - time.time())

    def wait_for_engines(self, n: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until at least ``n`` engines are registered and alive.

        Asks the controller first: the engines last published may be older than
        a death this client just learnt of (an engine stopped for its memory).
        """
        deadline = time.monotonic() + timeout_s
        self.status()
        while len(self.live_engine_ids()) < n:
            failures = self.connection.state.get("launch_failures", [])
            if failures:
                failure = failures[0]
                raise LauncherError(
                    f"An engine of cluster {self.id!r} (pid {failure['pid']}) exited with code "
                    f"{failure['exit_code']} before it registered. Its log ({failure['log']}) ends with:\n"
                    f"{_log_tail(failure['log'])}"
                )
            if time.monotonic() > deadline:
                raise DistTimeoutError(
                    f"Cluster {self.id!r} has {len(self.live_engine_ids())} of {n} engines after {timeout_s} s. "
                    "Look at the engine logs in the Jupyter runtime directory (`jupyter --runtime-dir`)."
                )
            time.sleep(0.05)
            self.status()

    def restart(
        self, engine_ids: Sequence[int], timeout_s: float = START_TIMEOUT_S
    ) -> TorchGroup | None:
        """Replace engines in place: each is killed (its work fails) and a fresh one takes its id.

        Returns once the new engines are registered. When one of them was a
        rank of the torch group ``c.torch()`` formed, the group is formed again
        over the same engines (on a new port) and returned. Raises
        ``ClusterError`` for an engine this cluster's controller did not start.
        """
        ids = [int(i) for i in engine_ids]
        group = self.connection.torch_group
        reply = self.connection.request(MsgType.RESTART_REQUEST, {"engine_ids": ids})
        refused = reply.content.get("refused", {})
        if refused:
            raise ClusterError("Cannot restart: " + "; ".join(refused.values()) + ".")
        deadline = time.monotonic() + timeout_s
        while True:
            states = {e.engine_id: e for e in self.status()}
            if all(i in states and states[i].state != "dead" for i in ids):
                break
            if time.monotonic() > deadline:
                raise DistTimeoutError(
                    f"Engines {ids} of cluster {self.id!r} did not come back within {timeout_s} s."
                )
            time.sleep(0.05)
        if group is None or not set(ids) & set(group.ranks):
            return None
        return self[group.engine_ids].torch(group.backend, group.timeout_s)

    def interrupt(self, engine_ids: Sequence[int] | None = None) -> None:
        """Raise ``KeyboardInterrupt`` in the code running on these engines (default: all)."""
        self.connection.interrupt(engine_ids=list(engine_ids) if engine_ids is not None else None)

    def monitor(self) -> ClusterMonitor:
        """A live ipywidgets monitor of this cluster: engines, GPUs, actors and tasks.

        It follows the cluster's state stream from a thread of its own and
        redraws at most twice a second, also while cells run; ``%dist monitor``
        shows the same widget.

        Examples
        --------
        >>> c.monitor()  # the last expression of a cell: the monitor shows below it
        """
        from jupyter_dist.widgets import ClusterMonitor  # ipywidgets only when a monitor is asked

        return ClusterMonitor(self)

    # ---- actors ------------------------------------------------------

    def actors(self) -> list[ActorInfo]:
        """The living actors: id, class, name, engine, pending calls, calls done, last state."""
        self.status()
        return [
            ActorInfo(
                actor_id=a["actor_id"],
                class_name=a["class_name"],
                name=a["name"],
                engine_id=a["engine_id"],
                pending=a["pending"],
                calls_done=a["calls_done"],
                restarts=a["restarts"],
                state=a["state"],
            )
            for a in self.connection.state.get("actors", [])
        ]

    def get_actor(self, name: str) -> ActorHandle:
        """A handle to the living actor made with ``name=...``, by any client of this cluster."""
        self.status()
        actors = self.connection.state.get("actors", [])
        for a in actors:
            if a["name"] == name:
                return ActorHandle(self.id, a["actor_id"], a["class_name"], a["methods"], name)
        names = ", ".join(repr(a["name"]) for a in actors if a["name"]) or "none"
        raise ClusterError(
            f"No actor named {name!r} lives in cluster {self.id!r} (named actors: {names})."
        )

    # ---- results -----------------------------------------------------

    def wait(self, future: Future) -> Any:
        """Wait for a future's value; a Ctrl-C interrupts the engines running its work."""
        try:
            return future.result()
        except KeyboardInterrupt:
            self.connection.interrupt(task_ids=_task_ids(future))
            raise

    def wait_any(
        self, pending: Collection[concurrent.futures.Future[Any]], task_ids: list[str]
    ) -> tuple[set[concurrent.futures.Future[Any]], set[concurrent.futures.Future[Any]]]:
        """Wait until one of ``pending`` is done; a Ctrl-C interrupts ``task_ids``."""
        try:
            done, still = concurrent.futures.wait(
                pending, return_when=concurrent.futures.FIRST_COMPLETED
            )
        except KeyboardInterrupt:
            self.connection.interrupt(task_ids=task_ids)
            raise
        return set(done), set(still)

    def get_result(self, task_id: str, timeout_s: float | None = None) -> Any:
        """The value of any task of this cluster by id, also one that finished while no client was connected.

        Raises the task's error, or ``ClusterError`` if the cluster does not know the id.
        """
        future = self.connection.fetch(task_id)
        if timeout_s is None:
            return self.wait(future)
        return future.result(timeout_s)

    def history(self, limit: int = 100) -> list[TaskInfo]:
        """The most recent tasks, newest first: id, kind, engine, state, submitted, finished."""
        reply = self.connection.request(MsgType.HISTORY_REQUEST, {"limit": limit})
        return [TaskInfo(**t) for t in reply.content["tasks"]]
