"""Capture what user code prints and hand it to the I/O thread as it is written.

Modelled on ipykernel's ``OutStream``: writes are buffered per task and
flushed every ``FLUSH_INTERVAL_S`` (or when the task ends), so a cell that
prints once a second shows a line once a second without a message per
character.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from contextvars import ContextVar

FLUSH_INTERVAL_S = 0.1

# (stream name, task id, text) -> sends one stream message; runs on the I/O thread.
StreamSender = Callable[[str, str, str], None]

# The task whose code runs in this thread or asyncio task: the main thread's task,
# or an actor's call (actors run on threads and event loops of their own).
current_task_id: ContextVar[str] = ContextVar("current_task_id", default="")


class OutStream(io.TextIOBase):
    """A text stream that forwards what is written to the task that is running."""

    def __init__(
        self,
        name: str,
        send: StreamSender,
        call_soon_threadsafe: Callable[[Callable[[], None]], None],
        call_later: Callable[[float, Callable[[], None]], object],
    ) -> None:
        super().__init__()
        self.name = name
        self._send = send
        self._call_soon_threadsafe = call_soon_threadsafe
        self._call_later = call_later
        self._lock = threading.Lock()
        self._pending: list[tuple[str, str]] = []
        self._is_flush_scheduled = False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if not text:
            return 0
        with self._lock:
            self._pending.append((current_task_id.get(), text))
            must_schedule = not self._is_flush_scheduled
            self._is_flush_scheduled = True
        if must_schedule:
            self._call_soon_threadsafe(self._schedule_flush)
        return len(text)

    def _schedule_flush(self) -> None:
        self._call_later(FLUSH_INTERVAL_S, self._send_pending)

    def flush(self) -> None:
        """Send what is buffered now (from any thread): used when a task ends."""
        if self._pending:  # nothing printed: no need to wake the I/O thread
            self._call_soon_threadsafe(self._send_pending)

    def _send_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._is_flush_scheduled = False
        merged: list[tuple[str, list[str]]] = []
        for task_id, text in pending:
            if merged and merged[-1][0] == task_id:
                merged[-1][1].append(text)
            else:
                merged.append((task_id, [text]))
        for task_id, texts in merged:
            self._send(self.name, task_id, "".join(texts))
