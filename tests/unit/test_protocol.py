"""Session.pack/unpack: signing, framing, replay detection and every way a message is refused."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from jupyter_dist import protocol
from jupyter_dist.errors import ProtocolError
from jupyter_dist.protocol import DELIM, PROTOCOL_VERSION, Buffer, MsgType, Session

KEY = b"unit-test-key"
LARGE_NBYTES = 256 * 1024  # above pyzmq's copy threshold, so frames are sent without a copy

# Frame positions in a packed message (no routing ids).
SIGNATURE, HEADER, PARENT, METADATA, CONTENT = 1, 2, 3, 4, 5
FIRST_BUFFER = 6


def sign(parts: Sequence[bytes], key: bytes = KEY) -> bytes:
    """Sign as any holder of the key can: to reach the checks that come after the signature."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        h.update(part)
    return h.hexdigest().encode()


def signed_message(
    header: dict[str, Any] | bytes,
    content: Any = None,
    parent: Any = None,
    metadata: Any = None,
    signed_buffers: Sequence[bytes] = (),
    raw_buffers: Sequence[bytes] = (),
) -> list[Buffer]:
    """A correctly signed message built by hand, whatever its header and body say."""
    body = [
        header if isinstance(header, bytes) else msgpack.packb(header),
        msgpack.packb({} if parent is None else parent),
        msgpack.packb({} if metadata is None else metadata),
        msgpack.packb({} if content is None else content),
    ]
    return [DELIM, sign([*body, *signed_buffers]), *body, *signed_buffers, *raw_buffers]


def valid_header(**changes: Any) -> dict[str, Any]:
    header = {
        "msg_id": "m1",
        "msg_type": "status_request",
        "session": "s1",
        "version": PROTOCOL_VERSION,
        "date": 0.0,
        "signed_buffers": 0,
        "buffer_sizes": [],
    }
    header.update(changes)
    return header


def replace(frames: Sequence[Buffer], index: int, frame: Buffer) -> list[Buffer]:
    out = list(frames)
    out[index] = frame
    return out


@pytest.fixture
def sender() -> Session:
    return Session(KEY, session_id="sender")


@pytest.fixture
def receiver() -> Session:
    return Session(KEY, session_id="receiver")


# ---- round trips -------------------------------------------------------------


def test_unpack_returns_what_pack_was_given(sender: Session, receiver: Session) -> None:
    frames = sender.pack(
        MsgType.TASK_REQUEST,
        {"task_id": "t1", "code": "x = 1"},
        parent={"msg_id": "p1"},
        metadata={"priority": 3},
        msg_id="m42",
    )

    idents, msg = receiver.unpack(frames)

    assert idents == []
    assert msg.msg_type == MsgType.TASK_REQUEST
    assert msg.msg_id == "m42"
    assert msg.header["session"] == "sender"
    assert msg.header["version"] == PROTOCOL_VERSION
    assert msg.content == {"task_id": "t1", "code": "x = 1"}
    assert msg.parent == {"msg_id": "p1"}
    assert msg.metadata == {"priority": 3}
    assert msg.buffers == []


def test_pack_gives_each_message_a_fresh_id(sender: Session) -> None:
    first = msgpack.unpackb(sender.pack(MsgType.STATUS_REQUEST, {})[HEADER])
    second = msgpack.unpackb(sender.pack(MsgType.STATUS_REQUEST, {})[HEADER])
    assert first["msg_id"] != second["msg_id"]


def test_unpack_splits_routing_ids_from_the_message(sender: Session, receiver: Session) -> None:
    frames = sender.pack(MsgType.STATUS_REQUEST, {})

    idents, msg = receiver.unpack([b"client-7", b"hop-2", *frames])

    assert idents == [b"client-7", b"hop-2"]
    assert msg.msg_type == MsgType.STATUS_REQUEST
    assert msg.envelope.signature == frames[SIGNATURE]  # kept, to forward it unchanged


def test_signed_and_raw_buffers_come_back_apart_as_memoryviews(
    sender: Session, receiver: Session
) -> None:
    frames = sender.pack(
        MsgType.TASK_REPLY,
        {},
        signed_buffers=[b"pickle-stream"],
        raw_buffers=[b"raw-1", b"raw-two"],
    )

    _, msg = receiver.unpack(frames)

    assert msg.header["signed_buffers"] == 1
    assert msg.header["buffer_sizes"] == [13, 5, 7]
    assert all(isinstance(b, memoryview) for b in msg.buffers)
    assert [b.tobytes() for b in msg.signed_buffers] == [b"pickle-stream"]
    assert [b.tobytes() for b in msg.raw_buffers] == [b"raw-1", b"raw-two"]


def test_pack_records_buffer_sizes_in_bytes_whatever_the_item_size(sender: Session) -> None:
    doubles = np.arange(10, dtype=np.float64).data

    header = msgpack.unpackb(sender.pack(MsgType.TASK_REPLY, {}, raw_buffers=[doubles])[HEADER])

    assert header["buffer_sizes"] == [80]


def test_session_refuses_an_empty_key() -> None:
    with pytest.raises(ValueError, match="signing key"):
        Session(b"")


# ---- the signature -----------------------------------------------------------


def test_unpack_rejects_a_forged_signature(sender: Session, receiver: Session) -> None:
    frames = sender.pack(MsgType.STATUS_REQUEST, {})
    forged = replace(frames, SIGNATURE, b"0" * 64)

    with pytest.raises(ProtocolError, match="bad signature"):
        receiver.unpack(forged)


def test_unpack_rejects_a_message_signed_with_another_key(receiver: Session) -> None:
    frames = Session(b"another-cluster-key").pack(MsgType.STATUS_REQUEST, {})

    with pytest.raises(ProtocolError, match="bad signature"):
        receiver.unpack(frames)


@pytest.mark.parametrize(
    ("index", "frame"),
    [
        (HEADER, msgpack.packb(valid_header(msg_type="shutdown_request"))),
        (PARENT, msgpack.packb({"msg_id": "someone-else"})),
        (METADATA, msgpack.packb({"priority": 99})),
        (CONTENT, msgpack.packb({"code": "import os; os.system('rm -rf ~')"})),
    ],
    ids=["header", "parent", "metadata", "content"],
)
def test_unpack_rejects_a_tampered_body_frame(
    sender: Session, receiver: Session, index: int, frame: bytes
) -> None:
    frames = sender.pack(MsgType.STATUS_REQUEST, {"code": "x = 1"})

    with pytest.raises(ProtocolError, match="bad signature"):
        receiver.unpack(replace(frames, index, frame))


def test_unpack_rejects_a_tampered_signed_buffer(sender: Session, receiver: Session) -> None:
    frames = sender.pack(MsgType.TASK_REQUEST, {}, signed_buffers=[b"harmless pickle"])
    evil = b"evil!!! pickle!"
    assert len(evil) == len(b"harmless pickle")  # same size: only the signature can tell

    with pytest.raises(ProtocolError, match="bad signature"):
        receiver.unpack(replace(frames, FIRST_BUFFER, evil))


def test_raw_buffers_are_not_covered_by_the_signature(sender: Session, receiver: Session) -> None:
    # By design: hashing array bytes would cost more than sending them. Only their sizes are signed.
    frames = sender.pack(
        MsgType.TASK_REQUEST, {}, signed_buffers=[b"pickle"], raw_buffers=[b"AAAA"]
    )

    _, msg = receiver.unpack(replace(frames, FIRST_BUFFER + 1, b"BBBB"))

    assert msg.raw_buffers[0].tobytes() == b"BBBB"


def test_unpack_rejects_a_raw_buffer_swapped_for_one_of_another_size(
    sender: Session, receiver: Session
) -> None:
    frames = sender.pack(
        MsgType.TASK_REQUEST, {}, signed_buffers=[b"pickle"], raw_buffers=[b"AAAA"]
    )

    with pytest.raises(ProtocolError, match="buffer of 5 bytes, header says 4"):
        receiver.unpack(replace(frames, FIRST_BUFFER + 1, b"BBBBB"))


@pytest.mark.parametrize(
    "change",
    [lambda fs: [*fs, b"extra"], lambda fs: fs[:-1]],
    ids=["added", "dropped"],
)
def test_unpack_rejects_a_buffer_count_that_differs_from_the_header(
    sender: Session, receiver: Session, change: Callable[[list[Buffer]], list[Buffer]]
) -> None:
    frames = sender.pack(MsgType.TASK_REQUEST, {}, raw_buffers=[b"one", b"two"])

    with pytest.raises(ProtocolError, match="header announces 2 buffers"):
        receiver.unpack(change(frames))


def test_unpack_rejects_a_header_claiming_more_signed_buffers_than_sent(receiver: Session) -> None:
    frames = signed_message(valid_header(signed_buffers=2, buffer_sizes=[3]), raw_buffers=[b"abc"])

    with pytest.raises(ProtocolError, match="header announces"):
        receiver.unpack(frames)


# ---- replays -----------------------------------------------------------------


def test_unpack_rejects_a_replayed_message(sender: Session, receiver: Session) -> None:
    frames = sender.pack(MsgType.STATUS_REQUEST, {})
    receiver.unpack(frames)

    with pytest.raises(ProtocolError, match="replayed"):
        receiver.unpack(frames)


def test_replay_history_forgets_the_oldest_signature_past_its_limit(
    sender: Session, receiver: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "REPLAY_HISTORY", 2)
    first, second, third = (sender.pack(MsgType.STATUS_REQUEST, {}) for _ in range(3))
    for frames in (first, second, third):
        receiver.unpack(frames)

    receiver.unpack(first)  # forgotten: accepted again
    with pytest.raises(ProtocolError, match="replayed"):
        receiver.unpack(third)


# ---- framing -----------------------------------------------------------------


def test_unpack_rejects_a_message_without_a_delimiter(sender: Session, receiver: Session) -> None:
    frames = sender.pack(MsgType.STATUS_REQUEST, {})

    with pytest.raises(ProtocolError, match="no delimiter"):
        receiver.unpack(frames[1:])


@pytest.mark.parametrize("kept", [0, 1, 2, 3, 4])
def test_unpack_rejects_a_truncated_message(sender: Session, receiver: Session, kept: int) -> None:
    frames = sender.pack(MsgType.STATUS_REQUEST, {})

    with pytest.raises(ProtocolError, match=f"truncated message: {kept} frames"):
        receiver.unpack(frames[: 1 + kept])


def test_unpack_rejects_an_unreadable_header(sender: Session, receiver: Session) -> None:
    frames = sender.pack(MsgType.STATUS_REQUEST, {})

    with pytest.raises(ProtocolError, match="unreadable header"):
        receiver.unpack(replace(frames, HEADER, b"\xc1 not msgpack"))


def test_unpack_rejects_a_header_that_is_not_a_map(sender: Session, receiver: Session) -> None:
    frames = sender.pack(MsgType.STATUS_REQUEST, {})

    with pytest.raises(ProtocolError, match="header is not a map"):
        receiver.unpack(replace(frames, HEADER, msgpack.packb([1, 2, 3])))


def test_unpack_rejects_a_header_without_buffer_counts(receiver: Session) -> None:
    header = valid_header()
    del header["buffer_sizes"]

    with pytest.raises(ProtocolError, match="lacks buffer counts"):
        receiver.unpack(signed_message(header))


# ---- checks after the signature: signed by a holder of the key ----------------


def test_unpack_accepts_a_message_signed_by_hand_with_the_key(receiver: Session) -> None:
    # Guards the tests below: they fail for the reason they name, not for a bad signature.
    _, msg = receiver.unpack(signed_message(valid_header(), content={"ok": True}))
    assert msg.content == {"ok": True}


@pytest.mark.parametrize("version", [PROTOCOL_VERSION + 1, 0, "1", None])
def test_unpack_rejects_another_protocol_version(receiver: Session, version: Any) -> None:
    frames = signed_message(valid_header(version=version))

    with pytest.raises(ProtocolError, match="install the same jupyter-dist everywhere"):
        receiver.unpack(frames)


def test_unpack_rejects_an_unknown_message_type(receiver: Session) -> None:
    frames = signed_message(valid_header(msg_type="launch_missiles_request"))

    with pytest.raises(ProtocolError, match="unknown message type 'launch_missiles_request'"):
        receiver.unpack(frames)


@pytest.mark.parametrize("field", ["parent", "metadata", "content"])
def test_unpack_rejects_a_body_frame_that_is_not_a_map(receiver: Session, field: str) -> None:
    body: dict[str, Any] = {field: ["not", "a", "map"]}
    frames = signed_message(valid_header(), **body)

    with pytest.raises(ProtocolError, match="must be maps"):
        receiver.unpack(frames)


def test_unpack_rejects_an_unreadable_body(receiver: Session) -> None:
    header = msgpack.packb(valid_header())
    body = [header, msgpack.packb({}), msgpack.packb({}), b"\xc1 not msgpack"]
    frames: list[Buffer] = [DELIM, sign(body), *body]

    with pytest.raises(ProtocolError, match="unreadable message body"):
        receiver.unpack(frames)


# ---- real zmq frames ----------------------------------------------------------


def test_unpack_reads_frames_from_recv_multipart_without_copying_buffers(
    sender: Session,
    receiver: Session,
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]],
    recv_frames: Callable[[zmq.Socket[Any]], list[zmq.Frame]],
) -> None:
    out, into = pair
    array = np.arange(LARGE_NBYTES // 8, dtype=np.float64)
    protocol.send(
        out,
        sender.pack(
            MsgType.TASK_REPLY, {"n": 1}, signed_buffers=[b"pickle"], raw_buffers=[array.data]
        ),
        idents=[b"engine-3"],
    )
    received = recv_frames(into)
    assert all(isinstance(f, zmq.Frame) for f in received)

    idents, msg = receiver.unpack(received)

    assert idents == [b"engine-3"]
    assert msg.content == {"n": 1}
    assert msg.signed_buffers[0].tobytes() == b"pickle"
    raw = msg.raw_buffers[0]
    assert isinstance(raw, memoryview)
    rebuilt = np.frombuffer(raw, dtype=np.float64)
    np.testing.assert_array_equal(rebuilt, array)
    frame = received[-1]
    assert np.shares_memory(rebuilt, np.frombuffer(frame.buffer, dtype=np.uint8))
    assert msg.envelope.raw[-1] is frame  # kept as received, for forwarding


def test_a_received_message_forwards_unchanged_to_another_process(
    sender: Session,
    receiver: Session,
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]],
    recv_frames: Callable[[zmq.Socket[Any]], list[zmq.Frame]],
) -> None:
    # The controller relays a task's frames to an engine as they came in.
    out, into = pair
    protocol.send(out, sender.pack(MsgType.TASK_REQUEST, {"task_id": "t9"}, raw_buffers=[b"xy"]))
    _, relayed = receiver.unpack(recv_frames(into))

    protocol.send(out, receiver.frames([relayed.envelope]))
    _, msg = Session(KEY).unpack(recv_frames(into))

    assert msg.content == {"task_id": "t9"}
    assert msg.raw_buffers[0].tobytes() == b"xy"


def test_pack_accepts_received_frames_as_buffers(
    sender: Session,
    receiver: Session,
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]],
    recv_frames: Callable[[zmq.Socket[Any]], list[zmq.Frame]],
) -> None:
    out, into = pair
    out.send_multipart([b"signed", b"x" * 1000])
    signed_frame, raw_frame = recv_frames(into)

    frames = sender.pack(
        MsgType.TASK_REPLY, {}, signed_buffers=[signed_frame], raw_buffers=[raw_frame]
    )
    _, msg = receiver.unpack(frames)

    assert msg.header["buffer_sizes"] == [6, 1000]
    assert msg.signed_buffers[0].tobytes() == b"signed"
    assert msg.raw_buffers[0].tobytes() == b"x" * 1000


# ---- batches ------------------------------------------------------------------


def batch_of_three(sender: Session) -> list[Buffer]:
    return sender.frames(
        [
            sender.envelope(MsgType.TASK_REQUEST, {"n": 0}, signed_buffers=[b"pickle-0"]),
            sender.envelope(MsgType.STREAM, {"n": 1}),
            sender.envelope(
                MsgType.TASK_REPLY,
                {"n": 2},
                parent={"msg_id": "p"},
                signed_buffers=[b"pickle-2"],
                raw_buffers=[b"raw-2a", b"raw-2bb"],
            ),
        ]
    )


def test_a_batch_gives_back_each_message_with_its_own_buffers(
    sender: Session, receiver: Session
) -> None:
    frames = batch_of_three(sender)

    _, batch = receiver.unpack(frames)
    messages = receiver.split(batch)

    assert batch.msg_type == MsgType.BATCH
    assert [m.msg_type for m in messages] == ["task_request", "stream", "task_reply"]
    assert [m.content["n"] for m in messages] == [0, 1, 2]
    assert [b.tobytes() for b in messages[0].signed_buffers] == [b"pickle-0"]
    assert messages[1].buffers == []
    assert [b.tobytes() for b in messages[2].signed_buffers] == [b"pickle-2"]
    assert [b.tobytes() for b in messages[2].raw_buffers] == [b"raw-2a", b"raw-2bb"]
    assert messages[2].parent == {"msg_id": "p"}


def test_split_of_a_single_message_is_that_message(sender: Session, receiver: Session) -> None:
    _, msg = receiver.unpack(sender.pack(MsgType.STATUS_REQUEST, {}))
    assert receiver.split(msg) == [msg]


def test_one_signature_covers_every_message_of_a_batch(sender: Session, receiver: Session) -> None:
    frames = batch_of_three(sender)
    _, batch = Session(KEY).unpack(frames)
    bodies = batch.content["messages"]
    bodies[1][3] = msgpack.packb({"n": "forged"})
    tampered = replace(frames, CONTENT, msgpack.packb({"messages": bodies}))

    with pytest.raises(ProtocolError, match="bad signature"):
        receiver.unpack(tampered)
    with pytest.raises(ProtocolError, match="bad signature"):  # a signed buffer of the second
        receiver.unpack(replace(frames, FIRST_BUFFER + 1, b"pickle-X"))


def test_a_message_taken_from_a_batch_forwards_alone_signed_anew(
    sender: Session, receiver: Session
) -> None:
    _, batch = receiver.unpack(batch_of_three(sender))
    third = receiver.split(batch)[2]
    assert third.envelope.signature is None  # it came without one of its own

    _, forwarded = Session(KEY).unpack(receiver.frames([third.envelope]))

    assert forwarded.content == {"n": 2}
    assert [b.tobytes() for b in forwarded.raw_buffers] == [b"raw-2a", b"raw-2bb"]


def signed_batch(
    bodies: Any, signed: Sequence[bytes] = (), raw: Sequence[bytes] = ()
) -> list[Buffer]:
    """A batch signed by hand, whatever its messages claim."""
    header = valid_header(
        msg_type="batch",
        signed_buffers=len(signed),
        buffer_sizes=[len(b) for b in (*signed, *raw)],
    )
    return signed_message(
        header, content={"messages": bodies}, signed_buffers=signed, raw_buffers=raw
    )


def inner(header: dict[str, Any], content: Any = None) -> list[bytes]:
    return [
        msgpack.packb(header),
        msgpack.packb({}),
        msgpack.packb({}),
        msgpack.packb(content or {}),
    ]


@pytest.mark.parametrize(
    ("bodies", "signed", "raw", "error"),
    [
        ("not a list", (), (), "must list its messages"),
        ([[1, 2, 3, 4]], (), (), "unreadable header"),
        ([[b"only", b"three", b"parts"]], (), (), "four packed maps"),
        ([inner(valid_header(msg_type="batch"))], (), (), "unknown message type 'batch'"),
        ([inner(valid_header(msg_type="rm -rf"))], (), (), "unknown message type"),
        ([inner(valid_header(version=0))], (), (), "protocol version"),
        ([inner(valid_header(signed_buffers=1, buffer_sizes=[3]))], (), (), "claims buffers"),
        ([inner(valid_header())], (b"abc",), (), "none of its messages claims"),
        ([inner(valid_header(buffer_sizes=[4]))], (), (b"abc",), "buffer of 3 bytes"),
        ([inner(valid_header(), content=[1, 2])], (), (), "must be maps"),
    ],
)
def test_split_refuses_a_batch_whose_messages_do_not_add_up(
    receiver: Session, bodies: Any, signed: Sequence[bytes], raw: Sequence[bytes], error: str
) -> None:
    _, batch = receiver.unpack(signed_batch(bodies, signed, raw))
    with pytest.raises(ProtocolError, match=error):
        receiver.split(batch)


def test_unpack_or_drop_drops_a_whole_batch_with_one_bad_message(
    receiver: Session, caplog: pytest.LogCaptureFixture
) -> None:
    good = inner(valid_header(msg_type="stream"))
    bad = inner(valid_header(msg_type="nonsense"))

    assert protocol.unpack_or_drop(receiver, signed_batch([good, bad]), "a test") is None
    assert "dropped a message from a test: unknown message type" in caplog.text


@pytest.mark.parametrize(
    ("msg_type", "content", "error"),
    [
        ("task_request", {"kind": "apply"}, "without its 'task_id'"),
        ("task_request", {"task_id": ["t"], "kind": "apply"}, "'task_id' is a malformed list"),
        ("task_request", {"task_id": "t", "kind": "format_disk"}, "'kind' is a malformed str"),
        ("task_request", {"task_id": "t", "kind": "execute"}, "without its 'code'"),
        ("task_request", {"task_id": "t", "kind": "apply", "target": True}, "'target'"),
        ("task_request", {"task_id": "t", "kind": "apply", "allowed": [0, "1"]}, "'allowed'"),
        ("task_request", {"task_id": "t", "kind": "apply", "retries": "2"}, "'retries'"),
        ("memory_exceeded", {"engine_id": 1}, "without its 'rss_bytes'"),
        ("register_request", {"host": "h"}, "without its 'pid'"),
        ("register_reply", {"engine_id": 0}, "without its 'status'"),
        ("result_request", {"task_ids": "abc"}, "'task_ids' is a malformed str"),
        ("state", {"seq": "9", "engines": []}, "'seq' is a malformed str"),
        ("state", {"seq": 1, "engines": [{"engine_id": 0}]}, "'engines'"),
        ("state", {"seq": 1, "engines": [], "x": {"y": b"bytes"}}, "JSON cannot carry"),
    ],
)
def test_unpack_or_drop_drops_signed_messages_whose_content_receivers_cannot_read(
    receiver: Session,
    caplog: pytest.LogCaptureFixture,
    msg_type: str,
    content: dict[str, Any],
    error: str,
) -> None:
    frames = signed_message(
        valid_header(msg_type=msg_type, signed_buffers=1, buffer_sizes=[6]),
        content,
        signed_buffers=[b"pickle"],
    )

    assert protocol.unpack_or_drop(receiver, frames, "a test") is None
    assert error in caplog.text


def test_unpack_or_drop_drops_a_parent_whose_msg_id_cannot_key_a_request(
    receiver: Session, caplog: pytest.LogCaptureFixture
) -> None:
    frames = signed_message(valid_header(), {}, parent={"msg_id": ["m"]})

    assert protocol.unpack_or_drop(receiver, frames, "a test") is None
    assert "the parent's msg_id must be a string" in caplog.text


def test_a_state_nested_deeper_than_the_recursion_limit_is_dropped_not_raised(
    receiver: Session,
) -> None:
    # msgpack reads 1,020 nested arrays (its packer refuses to write them): past Python's limit.
    pairs = [msgpack.packb(x) for x in ("seq", 1, "engines", [], "x")]
    content = b"\x83" + b"".join(pairs) + b"\x91" * 1020 + msgpack.packb(b"bytes")
    body = [msgpack.packb(valid_header(msg_type="state")), msgpack.packb({}), msgpack.packb({})]
    frames = [DELIM, sign([*body, content]), *body, content]

    assert protocol.unpack_or_drop(receiver, frames, "a test") is None
