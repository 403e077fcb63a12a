"""The state the controller publishes for monitors: what it folds in, and when it speaks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from jupyter_dist.controller.app import Controller
from jupyter_dist.protocol import MsgType

GPU = {
    "index": 0,
    "nvml_index": 3,
    "uuid": "GPU-1",
    "name": "NVIDIA H100",
    "utilization_percent": 55,
    "memory_used_bytes": 2**30,
    "memory_total_bytes": 80 * 2**30,
    "temperature_c": 51,
    "power_w": 301.5,
    "process_memory_bytes": 2**29,
}


@pytest.fixture
def controller(
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]],
) -> Iterator[Controller]:
    """A controller that is not started, publishing into the test's PAIR socket."""
    ctl = Controller(cluster_id="c0ffee")
    ctl.pub.close(linger=0)
    ctl.pub = pair[0]
    ctl.registry.register(b"engine-0", 4711, "gpu1", None)
    yield ctl
    ctl.pub = ctl.ctx.socket(zmq.PUB)  # the fixture closes the PAIR
    ctl._close()


def _heartbeat(ctl: Controller, metrics: dict[str, Any]) -> None:
    frames = ctl.session.pack(MsgType.HEARTBEAT_REQUEST, {"engine_id": 0, "metrics": metrics})
    _, msg = ctl.session.unpack(frames)
    ctl._handle_engine(b"engine-0", msg)


def _published(
    ctl: Controller,
    receiver: zmq.Socket[Any],
    recv_frames: Callable[..., list[zmq.Frame]],
) -> list[dict[str, Any]]:
    states = []
    while receiver.poll(0):
        _, msg = ctl.session.unpack(recv_frames(receiver))
        assert msg.msg_type == MsgType.STATE
        states.append(msg.content)
    return states


def test_the_state_folds_each_engine_metrics_and_gpus(
    controller: Controller,
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]],
    recv_frames: Callable[..., list[zmq.Frame]],
) -> None:
    _heartbeat(controller, {"cpu_percent": 97, "rss_bytes": 123_000_000, "gpus": [GPU]})
    controller._publish_state()

    (state,) = _published(controller, pair[1], recv_frames)
    (engine,) = state["engines"]
    assert state["cluster_id"] == "c0ffee"
    assert (engine["engine_id"], engine["state"], engine["host"]) == (0, "idle", "gpu1")
    assert (engine["cpu_percent"], engine["rss_bytes"], engine["gpus"]) == (97, 123_000_000, [GPU])
    assert state["tasks"] == {"pending": 0, "queued": 0, "done": 0, "failed": 0}
    assert state["actors"] == []


def test_unchanged_metrics_publish_nothing_and_changed_ones_publish_once(
    controller: Controller,
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]],
    recv_frames: Callable[..., list[zmq.Frame]],
) -> None:
    metrics = {"cpu_percent": 3, "rss_bytes": 100, "gpus": []}
    _heartbeat(controller, metrics)
    controller._publish_state()
    first = _published(controller, pair[1], recv_frames)

    _heartbeat(controller, dict(metrics))
    controller._publish_state()
    same = _published(controller, pair[1], recv_frames)

    for cpu in (50, 60, 70):  # three heartbeats between two publications
        _heartbeat(controller, {**metrics, "cpu_percent": cpu})
    controller._publish_state()
    changed = _published(controller, pair[1], recv_frames)

    assert len(first) == 1
    assert same == []
    assert [s["engines"][0]["cpu_percent"] for s in changed] == [70]
    assert changed[0]["seq"] == first[0]["seq"] + 1


def test_a_status_reply_carries_the_number_of_the_last_published_state(
    controller: Controller,
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]],
    recv_frames: Callable[..., list[zmq.Frame]],
) -> None:
    controller._publish_state()
    (published,) = _published(controller, pair[1], recv_frames)

    assert controller._status()["seq"] == published["seq"]
