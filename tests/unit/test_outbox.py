"""The Outbox: what a loop turn sends leaves as one wire message per peer, in order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import zmq

from jupyter_dist import outbox
from jupyter_dist.outbox import Outbox
from jupyter_dist.protocol import Envelope, Message, MsgType, Session, unpack_or_drop

KEY = b"outbox-test-key"


@pytest.fixture
def router_and_dealers(
    socket: Callable[[int], zmq.Socket[Any]], request: pytest.FixtureRequest
) -> tuple[zmq.Socket[Any], dict[bytes, zmq.Socket[Any]]]:
    """A ROUTER_MANDATORY socket (as the controller's) and two DEALERs it knows by id."""
    router = socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    address = f"inproc://{request.node.name}"
    router.bind(address)
    dealers = {}
    for ident in (b"a", b"b"):
        dealer = socket(zmq.DEALER)
        dealer.setsockopt(zmq.ROUTING_ID, ident)
        dealer.connect(address)
        dealer.send(b"hello")  # the router learns the routing id from a first message
        assert router.poll(5000)
        assert router.recv_multipart()[0] == ident
        dealers[ident] = dealer
    return router, dealers


@pytest.fixture
def box() -> Outbox:
    return Outbox(Session(KEY))


def stream(box: Outbox, i: int, raw: bytes = b"") -> Envelope:
    """A small message numbered ``i``, to follow its order."""
    return box.session.envelope(MsgType.STREAM, {"i": i}, raw_buffers=[raw] if raw else [])


def received(sock: zmq.Socket[Any]) -> list[list[Message]]:
    """The messages of each wire message waiting on ``sock`` (all were sent before)."""
    receiver = Session(KEY)
    out = []
    while sock.poll(100):
        unpacked = unpack_or_drop(receiver, sock.recv_multipart(copy=False), "test")
        assert unpacked is not None
        out.append(unpacked[1])
    return out


def test_messages_put_in_one_turn_reach_each_peer_as_one_message_in_order(
    router_and_dealers: tuple[zmq.Socket[Any], dict[bytes, zmq.Socket[Any]]], box: Outbox
) -> None:
    router, dealers = router_and_dealers
    for i in range(5):
        box.put(router, stream(box, i, b"x" * (i + 1)), b"a")
    box.put(router, stream(box, 99), b"b")

    box.flush()

    (messages,) = received(dealers[b"a"])
    assert [m.content["i"] for m in messages] == [0, 1, 2, 3, 4]
    assert [m.raw_buffers[0].tobytes() for m in messages] == [b"x" * (i + 1) for i in range(5)]
    ((single,),) = received(dealers[b"b"])
    assert single.envelope.signature is not None  # a lone message goes as it is, not as a batch
    assert single.content == {"i": 99}


def test_a_long_turn_is_split_into_batches_of_at_most_the_limit(
    router_and_dealers: tuple[zmq.Socket[Any], dict[bytes, zmq.Socket[Any]]], box: Outbox
) -> None:
    router, dealers = router_and_dealers
    count = outbox.MAX_BATCH_MESSAGES * 2 + 1
    for i in range(count):
        box.put(router, stream(box, i), b"a")

    box.flush()

    wire = received(dealers[b"a"])
    assert [len(messages) for messages in wire] == [outbox.MAX_BATCH_MESSAGES] * 2 + [1]
    assert [m.content["i"] for messages in wire for m in messages] == list(range(count))


def test_an_unreachable_peer_calls_back_each_of_its_messages_and_spares_the_others(
    router_and_dealers: tuple[zmq.Socket[Any], dict[bytes, zmq.Socket[Any]]], box: Outbox
) -> None:
    router, dealers = router_and_dealers
    lost: list[int] = []
    for i in range(3):
        box.put(router, stream(box, i), b"gone", lambda i=i: lost.append(i))
    box.put(router, stream(box, 7), b"a", lambda: lost.append(7))

    box.flush()

    assert lost == [0, 1, 2]
    assert [[m.content["i"] for m in messages] for messages in received(dealers[b"a"])] == [[7]]


def test_what_an_unreachable_callback_puts_is_sent_in_the_same_flush(
    router_and_dealers: tuple[zmq.Socket[Any], dict[bytes, zmq.Socket[Any]]], box: Outbox
) -> None:
    # The controller's answer to a vanished engine: fail its task to the client, now.
    router, dealers = router_and_dealers

    def tell_a() -> None:
        box.put(
            router,
            box.session.envelope(MsgType.TASK_REPLY, {"task_id": "t1", "status": "error"}),
            b"a",
        )

    box.put(router, box.session.envelope(MsgType.TASK_REQUEST, {}), b"gone", tell_a)
    box.flush()

    ((msg,),) = received(dealers[b"a"])
    assert msg.content == {"task_id": "t1", "status": "error"}
