"""Keep the id of the last task an engine started in a file that outlives the engine.

The controller sends each engine several tasks ahead and learns that one
finished from its reply. Replies can lag behind the work: the engine's I/O
thread waits for the GIL while its main thread runs short tasks back to
back. So when an engine is killed, its replies do not tell which of its
queued tasks had started; taking the head for the only one moved tasks that
had already run to other engines, where they ran a second time. Before
running a task the engine writes its id into a small shared-memory file (a
store into a mapping: no system call, and it survives the process), and the
controller reads the file once the engine is dead.

The file holds two slots and a selector byte: the id goes into the slot not
in use, then a one-byte store selects it, so a process killed halfway
through a write leaves the previous id readable.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Sequence

from jupyter_dist import shm

SLOT_NBYTES = 64
FILE_NBYTES = 1 + 2 * SLOT_NBYTES


def path_for(cluster_id: str, pid: int, directory: str = shm.SHM_DIR) -> str:
    return os.path.join(directory, f"jd-{cluster_id}-started-{pid}")


class StartRecord:
    """The engine's side: mark each task as started, just before it starts (main thread only)."""

    def __init__(self, path: str) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, FILE_NBYTES)
            self._mm = mmap.mmap(fd, FILE_NBYTES)
        finally:
            os.close(fd)
        self._selected = 0

    @classmethod
    def create(cls, cluster_id: str, pid: int) -> StartRecord | None:
        """The record of engine process ``pid``, or None where this host has no shared memory."""
        if shm.pool_for(cluster_id) is None:
            return None
        return cls(path_for(cluster_id, pid))

    def mark(self, task_id: str) -> None:
        """Record ``task_id`` as the task this engine starts now."""
        slot = 1 - self._selected
        start = 1 + slot * SLOT_NBYTES
        self._mm[start : start + SLOT_NBYTES] = task_id.encode()[:SLOT_NBYTES].ljust(
            SLOT_NBYTES, b"\0"
        )
        self._mm[0] = slot  # one byte: the id is readable whole, or the previous one is
        self._selected = slot

    def remove(self) -> None:
        """The engine ends normally: nobody needs the record."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def take_last_started(cluster_id: str, pid: int, directory: str = shm.SHM_DIR) -> str | None:
    """The id of the last task the dead engine ``pid`` started ("" for none), and remove its record.

    None when there is no record: the engine runs on another host, or this
    host has no shared memory. Read it only once the engine is dead.
    """
    path = path_for(cluster_id, pid, directory)
    try:
        with open(path, "rb") as f:
            content = f.read(FILE_NBYTES)
        os.unlink(path)
    except FileNotFoundError:
        return None
    if len(content) != FILE_NBYTES or content[0] not in (0, 1):
        return None
    start = 1 + content[0] * SLOT_NBYTES
    return content[start : start + SLOT_NBYTES].rstrip(b"\0").decode(errors="replace")


def count_started(in_flight: Sequence[str], last_started: str | None) -> int:
    """How many of an engine's tasks, in the order it runs them, had started when it died.

    Without a record, only the head is taken as started (what replies
    tell); a task that finished and whose reply came back is no longer in
    ``in_flight``, so when the last one started is not there, none had.
    """
    if last_started is None:
        return min(1, len(in_flight))
    if last_started in in_flight:
        return list(in_flight).index(last_started) + 1
    return 0
