"""How often an engine beats: every second while it has work, every two when it has none."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from jupyter_dist.connection_file import ClusterInfo
from jupyter_dist.engine.app import HEARTBEAT_INTERVAL_S, IDLE_HEARTBEAT_INTERVAL_S, Engine
from jupyter_dist.protocol import MsgType, Session


@pytest.fixture
def engine() -> Iterator[Engine]:
    """An engine not started: no sockets, no threads."""
    info = ClusterInfo("beat0", "ab" * 32, "127.0.0.1", 1, 2, 3, os.getpid(), "h", time.time())
    made = Engine(info)
    yield made
    made.metrics.close()
    made.loop.close()
    made.ctx.term()


def test_an_idle_engine_beats_half_as_often(engine: Engine) -> None:
    assert IDLE_HEARTBEAT_INTERVAL_S == 2 * HEARTBEAT_INTERVAL_S
    assert engine._heartbeat_interval_s() == IDLE_HEARTBEAT_INTERVAL_S


def test_an_engine_with_a_queued_or_running_task_beats_every_second(engine: Engine) -> None:
    frames = Session(b"k").pack(MsgType.TASK_REQUEST, {"task_id": "t1", "kind": "execute"})
    _, task = Session(b"k").unpack(frames)
    engine.tasks.put(task)
    assert engine._heartbeat_interval_s() == HEARTBEAT_INTERVAL_S
    assert engine.tasks.get() is task
    engine.is_running_user_code = True
    assert engine._heartbeat_interval_s() == HEARTBEAT_INTERVAL_S


def test_memory_is_watched_closely_only_while_work_is_here(engine: Engine) -> None:
    engine.memory_limit_bytes = 2**60  # far above what this process uses
    engine._check_memory()  # as at an idle heartbeat
    assert not engine.is_watching_memory  # an idle engine does not wake for it
    engine.is_running_user_code = True
    engine._check_memory()
    assert engine.is_watching_memory
    assert not engine.is_over_memory
