"""zmq fixtures for unit tests: one context per test, every socket closed with linger=0."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def socket(zmq_context: zmq.Context[Any]) -> Iterator[Callable[[int], zmq.Socket[Any]]]:
    """A factory of sockets on the test's context; each is closed with linger=0 at teardown."""
    made: list[zmq.Socket[Any]] = []

    def make(kind: int) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = zmq_context.socket(kind)
        sock.linger = 0
        made.append(sock)
        return sock

    yield make
    for sock in made:
        sock.close(linger=0)


@pytest.fixture
def pair(
    socket: Callable[[int], zmq.Socket[Any]], request: pytest.FixtureRequest
) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
    """Two connected inproc PAIR sockets: (sender, receiver)."""
    receiver = socket(zmq.PAIR)
    address = f"inproc://{request.node.name}-{id(receiver)}"
    receiver.bind(address)
    sender = socket(zmq.PAIR)
    sender.connect(address)
    return sender, receiver


@pytest.fixture
def recv_frames() -> Callable[[zmq.Socket[Any]], list[zmq.Frame]]:
    """Receive one multipart message as Frames, failing after 5 s instead of blocking forever."""

    def recv(sock: zmq.Socket[Any], timeout_s: float = 5.0) -> list[zmq.Frame]:
        if not sock.poll(int(timeout_s * 1000)):
            pytest.fail(f"no message arrived within {timeout_s} s")
        return sock.recv_multipart(copy=False)

    return recv
