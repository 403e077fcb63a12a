"""The actors living on this engine, each with a thread and an event loop of its own.

Calls run in the order they arrive (the controller keeps each caller's
order), one at a time unless the actor allows ``max_concurrency`` more:
then plain methods run on a pool of that many threads and ``async def``
methods interleave on the actor's loop. Actors never wait on the engine's
main thread, so tasks and actor calls on one engine run side by side.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jupyter_dist.actor_handle import STATE_METHOD
from jupyter_dist.engine.executor import Executor, Outcome, plain_error
from jupyter_dist.engine.streams import current_task_id
from jupyter_dist.errors import JupyterDistError, SerializationError
from jupyter_dist.protocol import Message

logger = logging.getLogger(__name__)

STATE_TEXT_MAX = 200

# (request, outcome, started) -> sends the task reply; callable from any thread.
Replier = Callable[[Message, Outcome, float], None]


def state_of(instance: Any) -> dict[str, Any]:
    """An actor's state: what ``__dist_state__()`` returns, else its public attributes."""
    custom = getattr(instance, STATE_METHOD, None)
    if callable(custom):
        return dict(custom())
    return {k: v for k, v in getattr(instance, "__dict__", {}).items() if not k.startswith("_")}


def _for_monitors(state: dict[str, Any]) -> dict[str, Any]:
    """A state that any monitor can show: plain values kept, others as a short repr."""
    shown: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, bool | int | float | type(None)):
            shown[str(key)] = value
        else:
            text = value if isinstance(value, str) else repr(value)
            shown[str(key)] = text[:STATE_TEXT_MAX]
    return shown


class _LiveActor:
    """One actor: its instance, its loop thread, and the calls waiting for it."""

    def __init__(
        self, actor_id: str, max_concurrency: int, executor: Executor, reply: Replier
    ) -> None:
        self.actor_id = actor_id
        self.max_concurrency = max(1, max_concurrency)
        self.executor = executor
        self.reply = reply
        self.instance: Any = None
        self.snapshot: dict[str, Any] | None = None
        self.sent_snapshot: dict[str, Any] | None = None
        self.loop = asyncio.new_event_loop()
        self.queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self.thread = threading.Thread(
            target=self._main, name=f"jupyter-dist-actor-{actor_id[:8]}", daemon=True
        )
        self.thread.start()

    def submit(self, msg: Message | None) -> None:
        """Queue a request (None: stop after the calls already running). Any thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, msg)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        if self.max_concurrency > 1:
            self.loop.set_default_executor(
                ThreadPoolExecutor(
                    self.max_concurrency,
                    thread_name_prefix=f"jupyter-dist-actor-{self.actor_id[:8]}",
                )
            )
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        slots = asyncio.Semaphore(self.max_concurrency)
        running: set[asyncio.Task[None]] = set()
        while (msg := await self.queue.get()) is not None:
            await slots.acquire()
            task = self.loop.create_task(self._run(msg))
            running.add(task)
            task.add_done_callback(running.discard)
            task.add_done_callback(lambda _: slots.release())

    async def _run(self, msg: Message) -> None:
        content = msg.content
        current_task_id.set(content["task_id"])
        started = time.time()
        signed = msg.signed_buffers
        try:
            payload = self.executor.load(content, signed[0] if signed else None, msg.raw_buffers)
        except SerializationError as e:
            self.reply(msg, Outcome(error=plain_error(e)), started)
            return
        if content["kind"] == "actor_create":
            outcome = self.executor.call(*payload)
            self.instance = outcome.value
            outcome.value = None  # the instance stays here
            if outcome.error is not None:
                self.queue.put_nowait(None)  # no instance: this actor ends (the controller says so)
        else:
            outcome = await self._call(content["method"], *payload)
        if outcome.error is None:
            self._take_snapshot()
        self.reply(msg, outcome, started)

    async def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:
        if method == STATE_METHOD:
            try:
                return Outcome(value=state_of(self.instance))
            except Exception as e:  # a user's __dist_state__ may raise anything
                return Outcome(error=self.executor.format_error(e))
        fn = getattr(self.instance, method, None)
        if fn is None:
            name = type(self.instance).__name__
            return Outcome(
                error={
                    "ename": "AttributeError",
                    "evalue": f"{name!r} actor has no method {method!r}",
                    "traceback": "",
                }
            )
        if not inspect.iscoroutinefunction(fn):
            if self.max_concurrency == 1:
                return self.executor.call(fn, args, kwargs)
            return await asyncio.to_thread(self.executor.call, fn, args, kwargs)
        try:
            args, kwargs = await asyncio.to_thread(self.executor.resolve_arguments, args, kwargs)
        except JupyterDistError as e:
            return Outcome(error=plain_error(e))
        try:
            return Outcome(value=await fn(*args, **kwargs))
        except BaseException as e:  # user code: everything it raises is reported
            return Outcome(error=self.executor.format_error(e))

    def _take_snapshot(self) -> None:
        try:
            self.snapshot = _for_monitors(state_of(self.instance))
        except Exception as e:  # a user's __dist_state__ may raise anything
            self.snapshot = {"error": f"{type(e).__name__}: {e}"}


class ActorHost:
    """Creates, calls and ends the actors of this engine."""

    def __init__(self, executor: Executor, reply: Replier) -> None:
        self.executor = executor
        self.reply = reply
        self._actors: dict[str, _LiveActor] = {}

    def handle(self, msg: Message) -> None:
        """Take an ``actor_create``, ``actor_call`` or ``actor_kill`` request (I/O thread)."""
        content = msg.content
        actor_id = content["actor_id"]
        kind = content["kind"]
        live: _LiveActor | None
        if kind == "actor_create":
            live = _LiveActor(
                actor_id, int(content.get("max_concurrency", 1)), self.executor, self.reply
            )
            self._actors[actor_id] = live
            live.submit(msg)
        elif kind == "actor_kill":
            live = self._actors.pop(actor_id, None)
            if live is not None:
                live.submit(None)
            self.reply(msg, Outcome(), time.time())
        elif (live := self._actors.get(actor_id)) is not None:
            live.submit(msg)
        else:
            evalue = f"actor {actor_id[:8]} does not live on engine {self.executor.engine_id}"
            self.reply(
                msg,
                Outcome(error={"ename": "ActorDiedError", "evalue": evalue, "traceback": ""}),
                time.time(),
            )

    @property
    def has_actors(self) -> bool:
        """Whether any actor lives here (the engine watches states only then)."""
        return bool(self._actors)

    def changed_states(self) -> list[tuple[str, dict[str, Any]]]:
        """(actor id, state) for each actor whose state changed since last asked (I/O thread)."""
        changed = []
        for actor_id, live in list(self._actors.items()):
            snapshot = live.snapshot
            if snapshot is not None and snapshot != live.sent_snapshot:
                live.sent_snapshot = snapshot
                changed.append((actor_id, snapshot))
        return changed
