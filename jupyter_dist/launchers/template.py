"""Start local engines by forking a template process that imported the engine once.

A fresh engine spends most of its start importing (IPython, psutil, zmq's
module, cloudpickle): about a quarter of a second of CPU each, which on a
small machine makes eight engines take seconds. The template imports all
of that once, then forks an engine per request; the children share the
imported pages copy-on-write, so each one also holds less memory of its
own. The template never creates a ZeroMQ context and never touches CUDA,
so nothing a child needs is broken by the fork; it imports torch only when
asked to preload it (a cluster started with ``torch=True``), and importing
torch initialises no CUDA.

The controller talks to the template over a pair of pipes, one JSON object
a line: requests ``{"connection_file", "engine_id", "environ", "log_path"}`` on its
stdin; ``{"started": pid}`` (one per request, in order) and ``{"exited":
pid, "code": code}`` (as children end) on its stdout. The template exits
when its stdin closes, that is when the controller is gone; its engines
then see their parent change and exit too, as they did when the
controller was their parent.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0

# Runs one engine in a forked child; returns its exit code.
EngineRunner = Callable[[dict[str, Any]], int]


# ---- the template process ---------------------------------------------


def serve(run_engine: EngineRunner, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
    """Fork an engine per request read from ``stdin_fd`` until it closes (the template's main)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # interrupts are for engines, not for this
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # only to wake select()
    gc.freeze()  # what is imported now is shared with every child: keep gc from touching it
    pending = b""
    while True:
        try:
            ready, _, _ = select.select([stdin_fd, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
            _reap(stdout_fd)
        if stdin_fd in ready:
            chunk = os.read(stdin_fd, 65536)
            if not chunk:
                return  # the controller is gone
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                pid = _fork_engine(
                    json.loads(line), run_engine, (stdin_fd, stdout_fd, wake_r, wake_w)
                )
                _write(stdout_fd, {"started": pid})


def _fork_engine(
    request: dict[str, Any], run_engine: EngineRunner, inherited_fds: tuple[int, ...]
) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: never return into the template's loop
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        gc.unfreeze()
        log_fd = os.open(request["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        for fd in {log_fd, null_fd, *inherited_fds} - {0, 1, 2}:
            os.close(fd)
        os.environ.update(
            request.get("environ") or {}
        )  # before any engine code: CUDA reads it once
        code = run_engine(request)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reap(stdout_fd: int) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _write(stdout_fd, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _write(fd: int, record: dict[str, Any]) -> None:
    os.write(fd, json.dumps(record).encode() + b"\n")


# ---- the controller's side ---------------------------------------------


class EngineTemplate:
    """A running template process, as the controller sees it: fork engines, learn how they ended."""

    def __init__(self, args: list[str]) -> None:
        logger.info("starting the engine template %s", " ".join(args))
        self.process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True
        )
        stdin, stdout = self.process.stdin, self.process.stdout
        if stdin is None or stdout is None:  # never with PIPE; keeps the types exact
            raise OSError("the engine template has no pipes")
        self._in = stdin.fileno()
        self._out = stdout.fileno()
        os.set_blocking(self._out, False)
        self._pending = b""
        self._started: list[int] = []
        self.exit_codes: dict[int, int] = {}
        self.has_ended = False  # its output closed: it reports nothing more

    def fileno(self) -> int:
        """Readable when the template reports (a fork, an exit) or has ended."""
        return self._out

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def fork(self, request: dict[str, Any]) -> int:
        """Ask for one engine; block until the template reports its pid (the first waits for imports).

        Raises ``OSError`` when the template is gone, ``TimeoutError`` when it does not answer.
        """
        os.write(self._in, json.dumps(request).encode() + b"\n")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._started:
            left = deadline - time.monotonic()
            if left <= 0 or not self.is_alive():
                raise TimeoutError("the engine template did not fork an engine")
            self.collect(min(left, 1.0))
        return self._started.pop(0)

    def collect(self, timeout_s: float = 0.0) -> None:
        """Read what the template reported, waiting up to ``timeout_s`` for something new."""
        ready, _, _ = select.select([self._out], [], [], timeout_s)
        if not ready:
            return
        try:
            chunk = os.read(self._out, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.has_ended = True
            return
        self._pending += chunk
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            record = json.loads(line)
            if "started" in record:
                self._started.append(int(record["started"]))
            elif "exited" in record:
                self.exit_codes[int(record["exited"])] = int(record["code"])


class ForkedEngine:
    """A Popen-like handle of an engine forked by the template (``poll``, ``wait``, ``kill``)."""

    def __init__(self, template: EngineTemplate, pid: int, log_path: str) -> None:
        self.template = template
        self.pid = pid
        self.log_path = log_path
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.template.collect()
            self.returncode = self.template.exit_codes.get(self.pid)
            if self.returncode is None and not self.template.is_alive():
                self.returncode = self._orphan_exit_code()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(f"engine pid {self.pid}", timeout or 0.0)
            self.template.collect(min(left, 1.0))
        return self.returncode  # type: ignore[return-value]  # set by poll()

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _orphan_exit_code(self) -> int | None:
        """The template died: nobody reaps this engine; it is gone once its pid is."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return -int(signal.SIGKILL)  # unknown; reported as killed
        return None
