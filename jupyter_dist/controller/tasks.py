"""Keep every task's record and result until a client has it, and a bounded history after.

A result that could not be delivered (its client was gone) is kept until
some client fetches it with ``get_result``. So is one sent to a client that
confirms what it takes in (``result_ack``) until it confirms: a client killed
with results in its socket's queue never had them. Collected results stay
for ``history()`` and late ``get_result`` calls until the history is full;
then the ones collected longest ago are dropped first. Collected results
wait in a queue of their own, so dropping one never walks past the kept
ones (a killed client's 100,000 results made every finish scan them all).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from jupyter_dist.protocol import Message

# Finished tasks kept for history() and late get_result calls (beyond it, collected ones go;
# uncollected ones stay whatever their number). Each holds its reply, 5 kB for a no-op's:
# 100,000 kept the controller at 500 MB, and it never came down after a burst of work.
MAX_FINISHED = 10_000
MAX_DELIVERED_RESULT_NBYTES = 256 * 1024 * 1024


class TaskState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(slots=True, eq=False)
class TaskRecord:
    """One task: who asked, where it runs, and how it ended."""

    task_id: str
    client_ident: bytes
    kind: str
    target: int | None
    request: Message | None  # kept until sent (balanced tasks: until finished, they may move)
    allowed: tuple[int, ...] | None = None  # engines a balanced task may run on (None: any)
    submitted: float = field(default_factory=time.time)
    engine_id: int | None = None
    state: TaskState = TaskState.QUEUED
    finished: float | None = None
    reply: Message | None = None
    is_delivered: bool = False
    is_ack_expected: bool = False  # its asker confirms the results it takes in
    is_from_engine: bool = False  # asked by an engine (an actor handle or a future it was given)
    actor_id: str | None = None
    waiters: list[tuple[bool, bytes]] = field(
        default_factory=list
    )  # (is engine, ident) asking for it
    times_sent: int = 0
    retries_left: int = 0  # runs again elsewhere this many times if its engine dies under it
    died_on: list[int] = field(default_factory=list)  # engines that died while running it
    segments: tuple[str, ...] = ()  # shared-memory segments its request names
    segment_receivers: int = 1  # tasks that name the same segments (a broadcast: one per engine)

    @property
    def is_finished(self) -> bool:
        return self.state in (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)

    def describe(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "kind": self.kind,
            "engine_id": self.engine_id,
            "state": str(self.state),
            "submitted": self.submitted,
            "finished": self.finished,
        }


def _reply_nbytes(record: TaskRecord) -> int:
    if record.reply is None:
        return 0
    return sum(b.nbytes for b in record.reply.buffers)


class TaskStore:
    """Task records by id, with finished ones kept in finishing order."""

    def __init__(
        self,
        max_finished: int = MAX_FINISHED,
        max_delivered_nbytes: int = MAX_DELIVERED_RESULT_NBYTES,
        on_unused_segments: Callable[[list[str]], None] = lambda names: None,
    ) -> None:
        # Called with the segments whose every receiving task finished: whoever received them
        # has them (renamed, or mapped for a broadcast); the others nobody will ever take.
        # A broadcast's tasks may arrive in several turns, the first finished before the
        # next arrives: so the count comes from the sender, not from the tasks seen so far.
        self.on_unused_segments = on_unused_segments
        self._segment_users: dict[str, int] = {}  # segment -> unfinished tasks naming it
        self.max_finished = max_finished
        self.max_delivered_nbytes = max_delivered_nbytes
        self._tasks: dict[str, TaskRecord] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()  # in finishing order
        self._delivered: OrderedDict[str, None] = OrderedDict()  # collected, in that order
        self._delivered_nbytes = 0
        self.count_done = 0
        self.count_failed = 0

    def add(self, record: TaskRecord) -> None:
        self._tasks[record.task_id] = record
        for name in record.segments:
            self._segment_users.setdefault(name, record.segment_receivers)

    def get(self, task_id: str) -> TaskRecord | None:
        return self._tasks.get(task_id)

    def finish(self, record: TaskRecord, state: TaskState, reply: Message | None) -> None:
        record.state = state
        record.finished = time.time()
        record.reply = reply
        record.request = None
        if record.segments:
            self._release_segments(record.segments)
        if state == TaskState.DONE:
            self.count_done += 1
        elif state == TaskState.FAILED:
            self.count_failed += 1
        self._finished[record.task_id] = None
        if reply is None:  # cancelled: nothing waits to be delivered, so it may go in its turn
            record.is_delivered = True
            self._collect(record)
        self._evict()

    def mark_delivered(self, record: TaskRecord) -> None:
        """Its reply was sent: it may go in its turn, once confirmed where the asker confirms."""
        record.is_delivered = True
        if not record.is_ack_expected:
            self._collect(record)

    def mark_collected(self, record: TaskRecord) -> None:
        """A client confirmed it has the result: it may go in its turn."""
        if self._tasks.get(record.task_id) is record:
            record.is_delivered = True
            self._collect(record)

    def _collect(self, record: TaskRecord) -> None:
        if record.task_id in self._finished and record.task_id not in self._delivered:
            self._delivered[record.task_id] = None
            self._delivered_nbytes += _reply_nbytes(record)
            self._evict()

    def mark_undelivered(self, record: TaskRecord) -> None:
        """The send marked delivered found its peer gone: keep the result for ``get_result``.

        Sends leave at the end of the loop's turn, after ``mark_delivered``.
        """
        if record.is_delivered and self._tasks.get(record.task_id) is record:
            record.is_delivered = False
            if record.task_id in self._delivered:
                del self._delivered[record.task_id]
                self._delivered_nbytes -= _reply_nbytes(record)

    def _release_segments(self, names: tuple[str, ...]) -> None:
        unused = []
        for name in names:
            users = self._segment_users.pop(name, 1) - 1
            if users > 0:
                self._segment_users[name] = users
            else:
                unused.append(name)
        if unused:
            self.on_unused_segments(unused)

    def pending_count(self) -> int:
        return len(self._tasks) - len(self._finished)

    def recent(self, limit: int) -> list[TaskRecord]:
        """The newest tasks first: unfinished ones, then finished ones by finishing time."""
        unfinished = [t for t in self._tasks.values() if not t.is_finished]
        unfinished.sort(key=lambda t: t.submitted, reverse=True)
        finished = [self._tasks[i] for i in reversed(self._finished)]
        return (unfinished + finished)[:limit]

    def _evict(self) -> None:
        """Drop the results delivered longest ago while over a limit; undelivered ones stay."""
        while self._delivered and (
            len(self._finished) > self.max_finished
            or self._delivered_nbytes > self.max_delivered_nbytes
        ):
            task_id, _ = self._delivered.popitem(last=False)
            record = self._tasks.pop(task_id)
            del self._finished[task_id]
            self._delivered_nbytes -= _reply_nbytes(record)
