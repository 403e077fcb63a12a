"""``ActorHandle``: call methods of an object living on an engine, from anywhere in the cluster.

A handle is small and picklable: it can be passed to a task or to another
actor's method and called there. Calls go through whatever link this
process has to the cluster (a notebook's client, or the engine the handle
arrived on), registered here as that cluster's ``ActorCaller``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from jupyter_dist.errors import ClusterError
from jupyter_dist.futures import Future

STATE_METHOD = "__dist_state__"


class ActorCaller(Protocol):
    """What sends actor calls from this process: the client's connection or an engine."""

    def call_actor(
        self, actor_id: str, label: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future: ...

    def kill_actor(self, actor_id: str) -> Future: ...


# Per cluster, this process's open links to it, newest last: closing one leaves the others.
_callers: dict[str, list[ActorCaller]] = {}


def register_caller(cluster_id: str, caller: ActorCaller) -> None:
    """Make ``caller`` send the calls of this process's handles to actors of ``cluster_id``."""
    _callers.setdefault(cluster_id, []).append(caller)


def unregister_caller(cluster_id: str, caller: ActorCaller) -> None:
    callers = _callers.get(cluster_id, [])
    if caller in callers:
        callers.remove(caller)


class ActorHandle:
    """A reference to an actor: ``A.method(...)`` returns a ``Future`` of the call's value.

    Calls on one actor run one at a time (unless it was made with
    ``max_concurrency``), in the order each caller made them.

    Examples
    --------
    >>> A = c.actor(Counter, 10)
    >>> A.incr(5).result()
    15
    >>> A.state()
    {'count': 15}
    """

    def __init__(
        self,
        cluster_id: str,
        actor_id: str,
        class_name: str,
        methods: list[str],
        name: str | None = None,
    ) -> None:
        self.cluster_id = cluster_id
        self.actor_id = actor_id
        self.class_name = class_name
        self.methods = list(methods)
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            ActorHandle,
            (self.cluster_id, self.actor_id, self.class_name, self.methods, self.name),
        )

    def __repr__(self) -> str:
        named = f" {self.name!r}" if self.name else ""
        return f"<ActorHandle {self.class_name}{named} {self.actor_id[:8]}>"

    @property
    def label(self) -> str:
        """How output of this actor's methods is tagged."""
        return self.name or self.class_name

    def _caller(self) -> ActorCaller:
        callers = _callers.get(self.cluster_id)
        if not callers:
            raise ClusterError(
                f"This handle of actor {self.label} belongs to cluster {self.cluster_id!r}, which this process "
                f"is not connected to. Connect first: `jd.Cluster.connect({self.cluster_id!r})`."
            )
        return callers[-1]

    def __getattr__(self, method: str) -> Callable[..., Future]:
        if method.startswith("_") or method not in self.methods:
            raise AttributeError(
                f"actor {self.label} ({self.class_name}) has no public method {method!r}; "
                f"it has: {', '.join(self.methods) or 'none'}"
            )

        def call(*args: Any, **kwargs: Any) -> Future:
            return self._caller().call_actor(self.actor_id, self.label, method, args, kwargs)

        call.__name__ = method
        return call

    def state(self, timeout_s: float | None = 30.0) -> dict[str, Any]:
        """The actor's public attributes (or what its ``__dist_state__()`` returns), after earlier calls."""
        future = self._caller().call_actor(self.actor_id, self.label, STATE_METHOD, (), {})
        value: dict[str, Any] = future.result(timeout_s)
        return value

    def kill(self) -> None:
        """End the actor; calls made later raise ``ActorDiedError``."""
        self._caller().kill_actor(self.actor_id).result(30)
