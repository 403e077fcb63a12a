"""Futures for remote work: concurrent.futures-compatible, awaitable, with jupyter-dist errors.

Shared by the client and the engines (an engine calling an actor holds
futures too). A ``Future`` sent as an argument of a task or actor call
travels as a ``FutureRef`` and is resolved on the engine that runs it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import weakref
from collections.abc import Callable, Generator, Sequence
from typing import Any

from jupyter_dist.errors import (
    ActorDiedError,
    CompositeRemoteError,
    DistTimeoutError,
    EngineDiedError,
    JupyterDistError,
    NoEnginesError,
    RemoteError,
    SerializationError,
)


class Future(concurrent.futures.Future[Any]):
    """The result of remote work, to come.

    A ``concurrent.futures.Future`` (``result(timeout)``, ``exception()``,
    ``done()``, ``cancel()``, ``add_done_callback``) that can also be
    awaited. ``id`` names the task (``c.get_result(id)`` fetches it later);
    ``engine`` is the id of the engine that ran it, once known.
    """

    # The futures a future made by ``then`` waits on, held until it is done: a
    # MultiFuture's children keep only a weak link to it, so nothing else would.
    steps: tuple[Future, ...] = ()

    def __init__(
        self, task_id: str, engine: int | None = None, on_cancel: Callable[[], None] | None = None
    ) -> None:
        super().__init__()
        self.id = task_id
        self.engine = engine
        self._on_cancel = on_cancel

    def __repr__(self) -> str:
        return f"<Future {self.id} engine={self.engine} {self._state.lower()}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FutureRef, (self.id,))

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self).__await__()

    def cancel(self) -> bool:
        """Cancel the work if it has not started; its result is ignored if it already runs."""
        if not super().cancel():
            return False
        if self._on_cancel is not None:
            self._on_cancel()
        return True

    def result(self, timeout: float | None = None) -> Any:
        try:
            return super().result(timeout)
        except concurrent.futures.TimeoutError:
            if self.done():
                raise  # the remote work itself raised a TimeoutError
            raise DistTimeoutError(
                f"Task {self.id} did not finish within {timeout} s. It keeps running: "
                "call `.result()` again to wait longer, or `.cancel()` it."
            ) from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return super().exception(timeout)
        except concurrent.futures.TimeoutError:
            raise DistTimeoutError(f"Task {self.id} did not finish within {timeout} s.") from None


class FutureRef:
    """A task's future as an argument on an engine: replaced by the task's value before the call."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id

    def __repr__(self) -> str:
        return f"<FutureRef {self.task_id}>"


class MultiFuture(Future):
    """One future over several: its value is ``combine`` of their values, in order.

    Failures are raised together: one engine's ``RemoteError`` as it is,
    several as a ``CompositeRemoteError``; other errors (a dead engine) win.
    """

    def __init__(
        self, task_id: str, children: Sequence[Future], combine: Callable[[list[Any]], Any]
    ) -> None:
        super().__init__(task_id)  # no on_cancel=self._cancel_children: a cycle (see below)
        self.children = list(children)
        self._combine = combine
        self._remaining = len(self.children)
        self._lock = threading.Lock()
        if not self.children:
            self.set_result(combine([]))
        # A weak link back, so a finished MultiFuture and its children are freed by
        # reference counting, not by a later garbage collection: their results can be
        # large arrays, and shared memory returns to its pool only when they are freed.
        ref = weakref.ref(self)
        for child in self.children:
            child.add_done_callback(functools.partial(_notify_parent, ref))

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError(
            "a Future of work on several engines cannot be an argument; pass its value "
            "(`f.result()`) or the Future of one engine's task (`f.children[0]`)"
        )

    def cancel(self) -> bool:
        """Cancel the children that have not started."""
        if not super().cancel():
            return False
        for child in self.children:
            child.cancel()
        return True

    def _child_done(self, _: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._remaining -= 1
            if self._remaining:
                return
        if self.done():
            return
        if any(c.cancelled() for c in self.children):
            self.cancel()
            return
        errors = [e for c in self.children if (e := c.exception()) is not None]
        if errors:
            self.set_exception(combine_errors(errors))
            return
        try:
            self.set_result(self._combine([c.result() for c in self.children]))
        except Exception as e:  # raised here it would be lost and leave the future pending
            self.set_exception(e)


def then(first: Future, step: Callable[[Any], Any]) -> Future:
    """A future of ``step(first's value)``; when ``step`` returns a future, of that one's value.

    For work done in two asks (a gather of large arrays). ``step`` runs where
    ``first`` finishes, on the client's I/O thread, so it must not wait.
    """
    out = Future(first.id)
    out.steps = (first,)
    out.add_done_callback(_drop_steps)

    def take(done: concurrent.futures.Future[Any]) -> None:
        if done.cancelled() or done.exception() is not None:
            _pass_on(done, out)
            return
        try:
            value = step(done.result())
        except Exception as e:
            out.set_exception(e)
            return
        if isinstance(value, Future):
            out.steps = (*out.steps, value)
            value.add_done_callback(functools.partial(_pass_on, dst=out))
        else:
            out.set_result(value)

    first.add_done_callback(take)
    return out


def _drop_steps(future: concurrent.futures.Future[Any]) -> None:
    if isinstance(future, Future):
        future.steps = ()  # their values (maybe large arrays) are not needed any more


def _pass_on(src: concurrent.futures.Future[Any], dst: Future) -> None:
    if src.cancelled():
        dst.cancel()
    elif (error := src.exception()) is not None:
        dst.set_exception(error)
    else:
        dst.set_result(src.result())


def _notify_parent(ref: weakref.ref[MultiFuture], child: concurrent.futures.Future[Any]) -> None:
    parent = ref()
    if parent is not None:
        parent._child_done(child)


def combine_errors(errors: Sequence[BaseException]) -> BaseException:
    """One error for several: the first non-remote one, else one or a composite RemoteError."""
    for error in errors:
        if not isinstance(error, RemoteError):
            return error
    remote = [e for e in errors if isinstance(e, RemoteError)]
    return remote[0] if len(remote) == 1 else CompositeRemoteError(remote)


def error_from_reply(
    content: dict[str, Any], cluster_id: str, torch_ranks: dict[int, int] | None = None
) -> JupyterDistError:
    """Build the exception a task reply describes (``torch_ranks``: engine id -> its rank)."""
    error = content.get("error") or {}
    ename = error.get("ename", "Error")
    evalue = error.get("evalue", "")
    engine_id = content.get("engine_id")
    if ename == "EngineDiedError" and "pid" in error:
        return EngineDiedError(
            engine_id if engine_id is not None else -1,
            pid=error.get("pid"),
            host=error.get("host", ""),
            exit_code=error.get("exit_code"),
            task_id=content.get("task_id", "") if error.get("was_running") else "",
            died_on=error.get("died_on") or (),
            rss_bytes=error.get("rss_bytes"),
            memory_limit_bytes=error.get("memory_limit_bytes"),
            is_restarting=bool(error.get("is_restarting")),
            torch_rank=(torch_ranks or {}).get(engine_id) if engine_id is not None else None,
        )
    if ename == "NoEnginesError":
        return NoEnginesError(cluster_id, evalue)
    if ename == "ActorDiedError":
        return ActorDiedError(evalue)
    if ename == "SerializationError":
        return SerializationError(f"[engine {engine_id}] {evalue}")
    return RemoteError(engine_id, ename, evalue, error.get("traceback", ""))
