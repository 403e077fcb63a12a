"""The controller's task store keeps undelivered results and drops delivered ones in bounded work."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from jupyter_dist.controller import tasks
from jupyter_dist.controller.tasks import TaskRecord, TaskState, TaskStore
from jupyter_dist.protocol import Message, MsgType, Session

SESSION = Session(b"test-key")


def _reply(task_id: str) -> Message:
    content = {"task_id": task_id, "engine_id": 0, "status": "ok"}
    return SESSION.unpack(SESSION.pack(MsgType.TASK_REPLY, content))[1]


def _finish(store: TaskStore, task_id: str, is_delivered: bool) -> TaskRecord:
    record = TaskRecord(task_id, b"client", "apply", None, None)
    store.add(record)
    store.finish(record, TaskState.DONE, _reply(task_id))
    if is_delivered:
        store.mark_delivered(record)
    return record


def _lines_run_in_tasks_module(work: Callable[[], None]) -> int:
    """How many lines of ``jupyter_dist/controller/tasks.py`` ``work`` runs: its work, untimed."""
    count = 0

    def on_line(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return on_line

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        return on_line if frame.f_code.co_filename == tasks.__file__ else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        work()
    finally:
        sys.settrace(previous)
    return count


def test_eviction_does_not_walk_past_undelivered_results_each_time() -> None:
    store = TaskStore(max_finished=10)
    n = 300
    for i in range(n):  # a killed client's results: kept, at the front of the history
        _finish(store, f"orphan-{i}", is_delivered=False)

    def finish_delivered() -> None:
        for i in range(n):
            _finish(store, f"live-{i}", is_delivered=True)

    lines = _lines_run_in_tasks_module(finish_delivered)
    # A few dozen lines per task; a scan past the 300 kept results each time is over 90,000.
    assert lines < 60 * n
    assert all(store.get(f"orphan-{i}") is not None for i in range(n))


def test_undelivered_results_are_kept_past_the_limit_and_delivered_ones_dropped_oldest_first() -> (
    None
):
    store = TaskStore(max_finished=3)
    kept = _finish(store, "kept", is_delivered=False)
    for i in range(5):
        _finish(store, f"done-{i}", is_delivered=True)
    assert store.get("kept") is kept
    assert [store.get(f"done-{i}") is not None for i in range(5)] == [False] * 3 + [True] * 2
    store.mark_delivered(kept)  # fetched at last with get_result: now it may go, in its turn
    _finish(store, "done-5", is_delivered=True)
    assert [r.task_id for r in store.recent(10)] == ["done-5", "done-4", "kept"]
    _finish(store, "done-6", is_delivered=True)
    _finish(store, "done-7", is_delivered=True)
    assert [r.task_id for r in store.recent(10)] == ["done-7", "done-6", "done-5"]


def test_a_result_whose_receiver_vanished_is_kept_again() -> None:
    store = TaskStore(max_finished=2)
    lost = _finish(store, "lost", is_delivered=True)
    store.mark_undelivered(lost)  # the client was gone when the send left
    for i in range(3):
        _finish(store, f"done-{i}", is_delivered=True)
    assert store.get("lost") is lost
    assert store.get("done-2") is not None
    assert store.get("done-1") is None


def test_delivered_results_are_dropped_beyond_the_byte_limit() -> None:
    store = TaskStore(max_delivered_nbytes=100)
    record = TaskRecord("big", b"client", "apply", None, None)
    store.add(record)
    content = {"task_id": "big", "engine_id": 0, "status": "ok"}
    reply = SESSION.unpack(SESSION.pack(MsgType.TASK_REPLY, content, signed_buffers=[b"x" * 101]))[
        1
    ]
    store.finish(record, TaskState.DONE, reply)
    assert store.get("big") is record  # undelivered: kept whatever its size
    store.mark_delivered(record)
    assert store.get("big") is None


def test_cancelled_tasks_leave_the_history_like_delivered_ones() -> None:
    store = TaskStore(max_finished=2)
    for i in range(5):
        record = TaskRecord(f"cancelled-{i}", b"client", "apply", None, None)
        store.add(record)
        store.finish(record, TaskState.CANCELLED, None)
    assert [r.task_id for r in store.recent(10)] == ["cancelled-4", "cancelled-3"]
    assert store.pending_count() == 0


def test_a_result_sent_to_a_confirming_client_is_kept_until_it_confirms() -> None:
    store = TaskStore(max_finished=1)
    sent = TaskRecord("sent", b"client", "apply", None, None, is_ack_expected=True)
    store.add(sent)
    store.finish(sent, TaskState.DONE, _reply("sent"))
    store.mark_delivered(sent)  # in the client's queue when it was killed, maybe
    for i in range(3):
        _finish(store, f"done-{i}", is_delivered=True)
    assert store.get("sent") is sent
    store.mark_collected(sent)
    _finish(store, "done-3", is_delivered=True)
    assert store.get("sent") is None


def test_a_segment_is_released_when_the_last_task_naming_it_finishes() -> None:
    released: list[list[str]] = []
    store = TaskStore(on_unused_segments=released.append)
    records = [
        TaskRecord(
            f"part-{i}",
            b"client",
            "push",
            i,
            None,
            segments=("jd-c0ffee-seg",),
            segment_receivers=2,
        )
        for i in range(2)
    ]
    for record in records:
        store.add(record)
    store.finish(records[0], TaskState.DONE, _reply("part-0"))
    assert released == []  # the other engine may not have mapped it yet
    store.finish(records[1], TaskState.FAILED, _reply("part-1"))
    assert released == [["jd-c0ffee-seg"]]


def test_a_broadcast_segment_outlives_its_first_task_when_the_next_has_not_arrived() -> None:
    # A broadcast's task requests may reach the controller in separate turns: the first
    # engine can finish before the second task is even known.
    released: list[list[str]] = []
    store = TaskStore(on_unused_segments=released.append)
    first, second = (
        TaskRecord(
            f"part-{i}",
            b"client",
            "push",
            i,
            None,
            segments=("jd-c0ffee-seg",),
            segment_receivers=2,
        )
        for i in range(2)
    )
    store.add(first)
    store.finish(first, TaskState.DONE, _reply("part-0"))
    assert released == []  # engine 1 has not mapped it: it must still be there
    store.add(second)
    store.finish(second, TaskState.DONE, _reply("part-1"))
    assert released == [["jd-c0ffee-seg"]]
