"""A small poll loop that owns a thread's sockets: readers, timers, and thread-safe calls.

One thread runs ``run()``; that thread alone touches the sockets it added.
Other threads hand it work with ``call_soon_threadsafe``, which appends to a
deque and writes a byte to a pipe the poller watches (the shape of
ipykernel's ``IOPubThread.schedule``). The loop never sleeps: it polls with
a timeout that ends at the next timer.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

logger = logging.getLogger(__name__)

MAX_BATCH = 256
_NOBLOCK = int(zmq.NOBLOCK)


class Timer:
    """A pending ``call_later``; ``cancel()`` stops it from running."""

    __slots__ = ("callback", "is_cancelled")

    def __init__(self, callback: Callable[[], Any]) -> None:
        self.callback = callback
        self.is_cancelled = False

    def cancel(self) -> None:
        self.is_cancelled = True


class IOLoop:
    """Poll sockets, run timers and run callbacks handed over from other threads."""

    def __init__(self) -> None:
        self._poller = zmq.Poller()
        self._readers: dict[Any, Callable[[list[zmq.Frame]], None]] = {}
        self._fd_readers: dict[int, Callable[[], Any]] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._counter = itertools.count()
        self._calls: deque[Callable[[], Any]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._is_wake_pending = False
        self._is_running = False
        self._turn_end: list[Callable[[], Any]] = []
        self._pipe_lock = threading.Lock()
        self._is_closed = False

    def add_socket(
        self, sock: zmq.Socket[Any], on_message: Callable[[list[zmq.Frame]], None]
    ) -> None:
        """Call ``on_message(frames)`` for each multipart message ``sock`` receives.

        At most ``MAX_BATCH`` messages are taken from one socket per turn, so
        a flood on one socket never starves the others or the timers.
        """
        self._readers[sock] = on_message
        self._poller.register(sock, zmq.POLLIN)

    def remove_socket(self, sock: zmq.Socket[Any]) -> None:
        if self._readers.pop(sock, None) is not None:
            self._poller.unregister(sock)

    def add_reader(self, fd: int, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` whenever ``fd`` is readable; it must read it, or remove it at its end."""
        self._fd_readers[fd] = callback
        self._poller.register(fd, zmq.POLLIN)

    def remove_reader(self, fd: int) -> None:
        if self._fd_readers.pop(fd, None) is not None:
            self._poller.unregister(fd)

    def at_turn_end(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` after every turn of the loop (its readers, calls and timers) and before the first.

        An ``Outbox`` flushes here, so whatever a turn sent leaves together.
        """
        self._turn_end.append(callback)

    def call_later(self, delay_s: float, callback: Callable[[], Any]) -> Timer:
        """Run ``callback`` on the loop's thread after ``delay_s`` seconds (loop thread only)."""
        timer = Timer(callback)
        heapq.heappush(self._timers, (time.monotonic() + delay_s, next(self._counter), timer))
        return timer

    def call_soon_threadsafe(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` on the loop's thread; safe to call from any thread.

        Only the first call after the loop last woke writes to the pipe: a
        burst of calls (thousands of submits) costs one wake-up, not one
        system call each. The loop clears the flag before it takes the calls,
        so a call that skips the write is always among those it takes.
        """
        self._calls.append(callback)
        if not self._is_wake_pending:
            self._is_wake_pending = True
            # Under the lock that close() takes: a call racing the loop's end must not write
            # to a closed descriptor, or worse, to a file that reused its number meanwhile.
            with self._pipe_lock, contextlib.suppress(BlockingIOError):  # full: it wakes anyway
                if not self._is_closed:
                    os.write(self._wake_w, b"x")

    def stop(self) -> None:
        """End ``run()`` after the current iteration; safe from any thread."""
        self.call_soon_threadsafe(self._halt)

    def _halt(self) -> None:
        self._is_running = False

    def run(self) -> None:
        """Serve sockets, timers and handed-over calls until ``stop()``."""
        self._is_running = True
        self._run_turn_end()  # what was sent before the loop started leaves now, not after a poll
        while self._is_running:
            for sock, _ in self._poller.poll(self._poll_timeout_ms()):
                if sock == self._wake_r:
                    self._drain_wakeups()
                    continue
                reader = self._readers.get(sock)
                if reader is not None:
                    self._receive(sock, reader)
                    continue
                fd_reader = self._fd_readers.get(sock)
                if fd_reader is not None:
                    self._run_guarded(fd_reader)
            self._run_handed_over()
            self._run_due_timers()
            self._run_turn_end()

    def _receive(
        self, sock: zmq.Socket[Any], on_message: Callable[[list[zmq.Frame]], None]
    ) -> None:
        for _ in range(MAX_BATCH):
            try:
                frames = [sock.recv(_NOBLOCK, copy=False)]
            except zmq.Again:
                return
            # The rest of a multipart message is already here (ZeroMQ delivers it whole).
            # Frame.more instead of recv_multipart's getsockopt(RCVMORE) and Flag maths.
            while frames[-1].more:
                frames.append(sock.recv(0, copy=False))
            self._run_guarded(functools.partial(on_message, frames))

    def _poll_timeout_ms(self) -> int | None:
        if self._calls:
            return 0
        while self._timers and self._timers[0][2].is_cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return None
        return max(0, int((self._timers[0][0] - time.monotonic()) * 1000) + 1)

    def _run_turn_end(self) -> None:
        for callback in self._turn_end:
            self._run_guarded(callback)

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _run_handed_over(self) -> None:
        self._is_wake_pending = False
        for _ in range(len(self._calls)):
            self._run_guarded(self._calls.popleft())

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.is_cancelled:
                self._run_guarded(timer.callback)

    @staticmethod
    def _run_guarded(callback: Callable[[], Any]) -> None:
        try:
            callback()
        except Exception:
            logger.exception("error in I/O loop callback %r", callback)

    def close(self) -> None:
        """Release the wake-up pipe (sockets belong to their owners); later calls are dropped."""
        with self._pipe_lock:
            if self._is_closed:
                return
            self._is_closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)
