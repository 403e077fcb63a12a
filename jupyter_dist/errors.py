"""The exceptions a user of jupyter-dist can see.

Every message says what happened, to what, and what to do next::

    JupyterDistError
    ├── ClusterError                no cluster, cannot connect, cannot start
    │   ├── ConnectionFileError     a connection file is missing or unreadable
    │   ├── NoEnginesError          the cluster has no engines to run on
    │   ├── ControllerGoneError     the controller died or stopped answering
    │   └── LauncherError           a controller or engine process did not start
    ├── EngineDiedError             an engine died while it held the work
    ├── ActorDiedError              an actor's engine died
    ├── SerializationError          a value cannot be pickled or unpickled
    ├── RemoteError                 user code raised on an engine
    │   └── CompositeRemoteError    user code raised on several engines
    └── DistTimeoutError            (also a TimeoutError) a wait ran out

``ProtocolError`` is internal: a malformed or forged message is logged and
dropped, never shown to a user.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

from jupyter_dist.quantities import format_nbytes

__all__ = [
    "ActorDiedError",
    "ClusterError",
    "CompositeRemoteError",
    "ConnectionFileError",
    "ControllerGoneError",
    "DistTimeoutError",
    "EngineDiedError",
    "JupyterDistError",
    "LauncherError",
    "NoEnginesError",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "describe_exit_code",
]


class JupyterDistError(Exception):
    """Base of every error jupyter-dist raises on purpose."""


class ClusterError(JupyterDistError):
    """There is no cluster, or it cannot be reached or started."""


class ControllerGoneError(ClusterError):
    """The cluster's controller died or stopped answering: its work is lost."""

    def __init__(self, cluster_id: str, reason: str) -> None:
        self.cluster_id = cluster_id
        self.reason = reason
        super().__init__(
            f"The controller of cluster {cluster_id!r} is gone ({reason}), and with it the work "
            "it held; its engines stop by themselves. Start a new cluster with `%dist start -n 4` "
            "or `jd.Cluster.start(n=4)`."
        )


class ConnectionFileError(ClusterError):
    """A connection file is missing, unreadable or malformed."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(
            f"Cannot use the connection file {path!r}: {problem}. "
            "`jupyter-dist list` shows the running clusters and their files."
        )


class NoEnginesError(ClusterError):
    """A call needs engines and the cluster (or view) has none."""

    def __init__(self, cluster_id: str, wanted: str = "") -> None:
        self.cluster_id = cluster_id
        detail = f" ({wanted})" if wanted else ""
        super().__init__(
            f"No engines are running in cluster {cluster_id!r}{detail}. "
            "Start some with `%dist start -n 4` or wait with `c.wait_for_engines(4)`."
        )


class LauncherError(ClusterError):
    """A controller or engine process could not be started."""


class EngineDiedError(JupyterDistError):
    """The engine holding a piece of work died before it finished.

    ``rss_bytes`` and ``memory_limit_bytes`` are set when the controller
    stopped the engine for passing its memory limit; ``is_restarting`` when
    it starts a fresh engine with the same id; ``torch_rank`` when the engine
    was a rank of the notebook's torch group (its collectives fail with it).
    """

    def __init__(
        self,
        engine_id: int,
        pid: int | None = None,
        host: str = "",
        exit_code: int | None = None,
        task_id: str = "",
        died_on: Sequence[int] = (),
        rss_bytes: int | None = None,
        memory_limit_bytes: int | None = None,
        is_restarting: bool = False,
        torch_rank: int | None = None,
    ) -> None:
        self.engine_id = engine_id
        self.torch_rank = torch_rank
        self.pid = pid
        self.host = host
        self.exit_code = exit_code
        self.task_id = task_id
        self.died_on = list(died_on)  # every engine that died running this task, in order
        self.rss_bytes = rss_bytes
        self.memory_limit_bytes = memory_limit_bytes
        self.is_restarting = is_restarting
        where = ""
        if pid:
            where = f" (pid {pid} on {host})" if host else f" (pid {pid})"
        during = f" during task {task_id}" if task_id else ""
        if rss_bytes is not None and memory_limit_bytes is not None:
            super().__init__(
                _over_memory_message(
                    engine_id, where, during, rss_bytes, memory_limit_bytes, is_restarting
                )
            )
            return
        how = f" with {describe_exit_code(exit_code)}" if exit_code is not None else ""
        hint = ""
        if exit_code == -signal.SIGKILL:
            hint = " The OS may have killed it for memory."
        tries = ""
        if len(self.died_on) > 1:
            engines = ", ".join(str(i) for i in self.died_on[:-1]) + f" and {self.died_on[-1]}"
            tries = f" It was tried {len(self.died_on)} times; the engines it died on: {engines}."
        if torch_rank is not None:
            super().__init__(
                f"Torch rank {torch_rank} (engine {engine_id}{where}) died{how}{during}.{hint} "
                "The collectives of the other ranks fail without it. "
                f"`%dist restart {engine_id}` replaces it and forms the torch group again."
            )
            return
        super().__init__(
            f"Engine {engine_id}{where} died{how}{during}.{hint}{tries} "
            f"`%dist restart {engine_id}` replaces it."
        )


class ActorDiedError(JupyterDistError):
    """The engine an actor lived on died, so the actor is gone."""


class SerializationError(JupyterDistError):
    """A value could not be pickled to send, or unpickled on arrival."""


class RemoteError(JupyterDistError):
    """User code raised an exception on an engine.

    Keeps the engine's id, the exception's name and value, and the
    traceback as the engine formatted it (with the user's own source lines).
    IPython shows that traceback instead of a local one.
    """

    def __init__(self, engine_id: int | None, ename: str, evalue: str, traceback: str) -> None:
        self.engine_id = engine_id
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        super().__init__(self._summary())

    def _summary(self) -> str:
        return f"[engine {self.engine_id}] {self.ename}: {self.evalue}"

    def __str__(self) -> str:
        return f"{self._summary()}\n{self.traceback}"

    def _render_traceback_(self) -> list[str]:
        return [f"[engine {self.engine_id}]", *self.traceback.splitlines()]


class CompositeRemoteError(RemoteError):
    """User code raised on several engines; ``errors`` has one per engine.

    Each distinct traceback is shown once, tagged with every engine that
    raised it.
    """

    def __init__(self, errors: Sequence[RemoteError]) -> None:
        self.errors = list(errors)
        first = self.errors[0]
        super().__init__(first.engine_id, first.ename, first.evalue, first.traceback)

    def _groups(self) -> list[tuple[list[int | None], RemoteError]]:
        groups: dict[str, tuple[list[int | None], RemoteError]] = {}
        for error in self.errors:
            key = f"{error.ename}\n{error.evalue}\n{error.traceback}"
            groups.setdefault(key, ([], error))[0].append(error.engine_id)
        return list(groups.values())

    def _summary(self) -> str:
        return f"{len(self.errors)} engines raised: " + "; ".join(
            f"[engines {_engine_list(ids)}] {e.ename}: {e.evalue}" for ids, e in self._groups()
        )

    def __str__(self) -> str:
        parts = [self._summary()]
        for ids, error in self._groups():
            parts.append(f"[engines {_engine_list(ids)}]\n{error.traceback}")
        return "\n".join(parts)

    def _render_traceback_(self) -> list[str]:
        lines = [self._summary()]
        for ids, error in self._groups():
            lines.append(f"[engines {_engine_list(ids)}]")
            lines.extend(error.traceback.splitlines())
        return lines


class DistTimeoutError(JupyterDistError, TimeoutError):
    """A wait for results, engines or a cluster ran past its timeout."""


class ProtocolError(JupyterDistError):
    """A wire message is forged, truncated or malformed (internal: logged, dropped)."""


def _over_memory_message(
    engine_id: int,
    where: str,
    during: str,
    rss_bytes: int,
    limit_bytes: int,
    is_restarting: bool,
) -> str:
    limit = format_nbytes(limit_bytes)
    used = format_nbytes(rss_bytes, like=limit_bytes)
    if used == limit:  # just over: show the digits that tell them apart
        used = format_nbytes(rss_bytes, like=limit_bytes, digits=6)
    then = (
        f"A fresh engine {engine_id} takes its place (the names defined there are gone: run your setup again)."
        if is_restarting
        else f"`%dist restart {engine_id}` replaces it."
    )
    return (
        f"Engine {engine_id} used {used}, over its {limit} limit, so it was stopped{where}{during}. "
        f"{then} Use less memory per engine, or start the cluster with a larger `--memory-limit`."
    )


def _engine_list(engine_ids: Sequence[int | None]) -> str:
    return ",".join(str(i) for i in engine_ids)


def describe_exit_code(exit_code: int) -> str:
    """Name an exit code the way a person reads it: ``SIGKILL(-9)`` or ``exit code 1``."""
    if exit_code < 0:
        try:
            return f"{signal.Signals(-exit_code).name}({exit_code})"
        except ValueError:
            return f"signal {-exit_code}"
    return f"exit code {exit_code}"
