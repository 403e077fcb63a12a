"""The record of the last task an engine started, read after its death."""

from __future__ import annotations

from pathlib import Path

from jupyter_dist import start_record
from jupyter_dist.start_record import StartRecord, count_started, take_last_started


def test_the_last_marked_task_is_read_once_and_the_record_removed(tmp_path: Path) -> None:
    record = StartRecord(start_record.path_for("c0ffee", 42, str(tmp_path)))
    assert take_last_started("c0ffee", 42, str(tmp_path)) == ""  # made, nothing started
    record = StartRecord(start_record.path_for("c0ffee", 42, str(tmp_path)))
    for task_id in ("a" * 32, "b" * 32, "c" * 32):
        record.mark(task_id)
    assert take_last_started("c0ffee", 42, str(tmp_path)) == "c" * 32
    assert take_last_started("c0ffee", 42, str(tmp_path)) is None  # no record: unknown


def test_a_write_cut_short_leaves_the_previous_id(tmp_path: Path) -> None:
    path = start_record.path_for("c0ffee", 7, str(tmp_path))
    StartRecord(path).mark("a" * 32)
    content = bytearray(Path(path).read_bytes())
    start = 1 + (1 - content[0]) * start_record.SLOT_NBYTES  # the slot the next mark writes
    content[start : start + 5] = b"bbbbb"  # killed after 5 bytes, before the selector
    Path(path).write_bytes(bytes(content))
    assert take_last_started("c0ffee", 7, str(tmp_path)) == "a" * 32


def test_tasks_up_to_the_last_started_count_as_started() -> None:
    in_flight = ["t1", "t2", "t3", "t4"]
    assert count_started(in_flight, "t3") == 3  # t1 and t2 finished, replies not in yet
    assert count_started(in_flight, "t0") == 0  # its reply came back: nothing later started
    assert count_started(in_flight, "") == 0
    assert count_started(in_flight, None) == 1  # no record: the head, as replies tell
    assert count_started([], None) == 0
