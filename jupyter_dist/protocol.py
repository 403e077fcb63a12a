"""Sign, frame and parse the multipart messages every process speaks.

A message on the wire is::

    [routing ids..., DELIM, signature, header, parent, metadata, content,
     signed buffers..., raw buffers...]

header, parent, metadata and content are msgpack maps. The signature is an
HMAC-SHA256 over those four frames and the *signed* buffers (a pickle
stream: running it would run code). Raw buffers carry only array bytes, so
they are not hashed (that would cost more than sending them); their count
and sizes are in the signed header, so none can be added, dropped or
resized unseen. A message that fails any check raises ``ProtocolError``
before anything in it is decoded further or unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypedDict, cast

import msgpack
import zmq

from jupyter_dist.errors import ProtocolError

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
DELIM = b"<IDS|MSG>"
REPLAY_HISTORY = 1 << 16

Buffer = bytes | memoryview | zmq.Frame


class MsgType(StrEnum):
    """Every message type, declared once. Requests pair with replies."""

    REGISTER_REQUEST = "register_request"  # engine -> controller
    REGISTER_REPLY = "register_reply"
    HEARTBEAT_REQUEST = "heartbeat_request"  # engine -> controller, carries metrics
    HEARTBEAT_REPLY = "heartbeat_reply"
    TASK_REQUEST = "task_request"  # client -> controller -> engine
    TASK_REPLY = "task_reply"  # engine -> controller -> client
    STREAM = "stream"  # engine -> controller -> client: stdout/stderr text
    DISPLAY_DATA = "display_data"  # engine -> controller -> client: a rich output
    EXECUTE_RESULT = "execute_result"  # engine -> controller -> client: a cell's value, shown
    ACTOR_STATE = "actor_state"  # engine -> controller: an actor's state changed
    CONNECT_REQUEST = "connect_request"  # client -> controller
    CONNECT_REPLY = "connect_reply"
    STATUS_REQUEST = "status_request"
    STATUS_REPLY = "status_reply"
    RESULT_REQUEST = "result_request"
    RESULT_REPLY = "result_reply"
    HISTORY_REQUEST = "history_request"
    HISTORY_REPLY = "history_reply"
    CANCEL_REQUEST = "cancel_request"
    CANCEL_REPLY = "cancel_reply"
    INTERRUPT_REQUEST = "interrupt_request"  # client -> controller -> engine
    INTERRUPT_REPLY = "interrupt_reply"
    STEAL_REQUEST = "steal_request"  # controller -> engine: give back unstarted tasks
    STEAL_REPLY = "steal_reply"
    RESTART_REQUEST = "restart_request"  # client -> controller: replace engines in place
    RESTART_REPLY = "restart_reply"
    SHUTDOWN_REQUEST = "shutdown_request"  # client -> controller, controller -> engine
    SHUTDOWN_REPLY = "shutdown_reply"
    STATE = "state"  # controller PUB: the cluster's state for monitors


class Header(TypedDict):
    """The signed header of every message."""

    msg_id: str
    msg_type: str
    session: str
    version: int
    date: float
    signed_buffers: int
    buffer_sizes: list[int]


@dataclass(slots=True)
class Message:
    """A parsed, verified message. ``frames`` keeps the wire frames for forwarding."""

    header: Header
    parent: dict[str, Any]
    metadata: dict[str, Any]
    content: dict[str, Any]
    buffers: list[memoryview]
    frames: list[Buffer] = field(repr=False)

    @property
    def msg_type(self) -> str:
        return self.header["msg_type"]

    @property
    def msg_id(self) -> str:
        return self.header["msg_id"]

    @property
    def signed_buffers(self) -> list[memoryview]:
        return self.buffers[: self.header["signed_buffers"]]

    @property
    def raw_buffers(self) -> list[memoryview]:
        return self.buffers[self.header["signed_buffers"] :]


_KNOWN_TYPES = frozenset(m.value for m in MsgType)


class _IdSource:
    """A random 64-bit prefix per process and a counter: unique ids without a syscall each.

    ``uuid4()`` reads ``os.urandom`` for every id, a tenth of the client's
    time per task at thousands of tasks per second. A forked child draws a
    prefix of its own.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()


_ids = _IdSource()
os.register_at_fork(after_in_child=_ids.reset)


def new_id() -> str:
    """A fresh unique id for messages, tasks and sessions (32 hex digits, like a uuid's)."""
    return f"{_ids.prefix}{next(_ids.counter):016x}"


def _nbytes(buf: Buffer) -> int:
    if isinstance(buf, zmq.Frame):
        return len(buf)
    return memoryview(buf).nbytes


def _as_view(buf: Buffer) -> memoryview:
    if isinstance(buf, zmq.Frame):
        return buf.buffer
    return memoryview(buf)


class Session:
    """Packs and checks messages for one process with the cluster's key.

    Not thread-safe: each thread that sends or receives has its own, or
    hands its work to the one I/O thread that owns it.
    """

    def __init__(self, key: bytes, session_id: str | None = None) -> None:
        if not key:
            raise ValueError(
                "a Session needs the cluster's signing key; an empty key signs nothing"
            )
        self.session_id = session_id or new_id()
        self._hmac = hmac.new(key, digestmod=hashlib.sha256)
        self._seen: set[bytes] = set()
        self._seen_order: deque[bytes] = deque()

    def _sign(self, parts: Sequence[Buffer]) -> bytes:
        h = self._hmac.copy()
        for part in parts:
            h.update(_as_view(part))
        return h.hexdigest().encode()

    def pack(
        self,
        msg_type: MsgType,
        content: dict[str, Any],
        parent: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        signed_buffers: Sequence[Buffer] = (),
        raw_buffers: Sequence[Buffer] = (),
        msg_id: str | None = None,
    ) -> list[Buffer]:
        """Build the frames of a message, from the delimiter on (no routing ids)."""
        buffers = [*signed_buffers, *raw_buffers]
        header: Header = {
            "msg_id": msg_id or new_id(),
            "msg_type": str(msg_type),
            "session": self.session_id,
            "version": PROTOCOL_VERSION,
            "date": time.time(),
            "signed_buffers": len(signed_buffers),
            "buffer_sizes": [_nbytes(b) for b in buffers],
        }
        body: list[Buffer] = [
            msgpack.packb(header),
            msgpack.packb(parent or {}),
            msgpack.packb(metadata or {}),
            msgpack.packb(content),
        ]
        signature = self._sign([*body, *signed_buffers])
        return [DELIM, signature, *body, *buffers]

    def unpack(self, frames: Sequence[Buffer]) -> tuple[list[bytes], Message]:
        """Split routing ids from a verified message; raise ProtocolError on any fault."""
        views = [_as_view(f) for f in frames]
        for i, view in enumerate(views):
            if view.nbytes == len(DELIM) and view.tobytes() == DELIM:
                delim = i
                break
        else:
            raise ProtocolError("no delimiter frame: not a jupyter-dist message")
        idents = [v.tobytes() for v in views[:delim]]
        rest = views[delim + 1 :]
        if len(rest) < 5:
            raise ProtocolError(
                f"truncated message: {len(rest)} frames after the delimiter, need 5"
            )
        signature = rest[0].tobytes()
        body = rest[1:5]
        try:
            header = msgpack.unpackb(body[0])
        except (ValueError, msgpack.UnpackException) as e:
            raise ProtocolError(f"unreadable header: {e}") from e
        if not isinstance(header, dict):
            raise ProtocolError("header is not a map")
        signed_count = header.get("signed_buffers")
        sizes = header.get("buffer_sizes")
        if not isinstance(signed_count, int) or not isinstance(sizes, list):
            raise ProtocolError("header lacks buffer counts")
        buffers = rest[5:]
        if len(buffers) != len(sizes) or not 0 <= signed_count <= len(buffers):
            raise ProtocolError(
                f"header announces {len(sizes)} buffers, message has {len(buffers)}"
            )
        expected = self._sign([*body, *buffers[:signed_count]])
        if not hmac.compare_digest(expected, signature):
            raise ProtocolError("bad signature: the message was not signed with this cluster's key")
        if signature in self._seen:
            raise ProtocolError("replayed message: this signature was seen before")
        self._remember(signature)
        if header.get("version") != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {header.get('version')!r}, this process speaks "
                f"{PROTOCOL_VERSION}: install the same jupyter-dist everywhere"
            )
        if header.get("msg_type") not in _KNOWN_TYPES:
            raise ProtocolError(f"unknown message type {header.get('msg_type')!r}")
        for buf, size in zip(buffers, sizes, strict=True):
            if buf.nbytes != size:
                raise ProtocolError(f"buffer of {buf.nbytes} bytes, header says {size}")
        try:
            parent, metadata, content = (msgpack.unpackb(b) for b in body[1:4])
        except (ValueError, msgpack.UnpackException) as e:
            raise ProtocolError(f"unreadable message body: {e}") from e
        if not (
            isinstance(parent, dict) and isinstance(metadata, dict) and isinstance(content, dict)
        ):
            raise ProtocolError("parent, metadata and content must be maps")
        message = Message(
            header=cast(Header, header),
            parent=parent,
            metadata=metadata,
            content=content,
            buffers=list(buffers),
            frames=list(frames[delim:]),
        )
        return idents, message

    def _remember(self, signature: bytes) -> None:
        self._seen.add(signature)
        self._seen_order.append(signature)
        if len(self._seen_order) > REPLAY_HISTORY:
            self._seen.discard(self._seen_order.popleft())


def unpack_or_drop(
    session: Session, frames: Sequence[Buffer], peer: str
) -> tuple[list[bytes], Message] | None:
    """Unpack a received message, or log one warning and return None if it fails a check."""
    try:
        return session.unpack(frames)
    except ProtocolError as e:
        logger.warning("dropped a message from %s: %s", peer, e)
        return None


_SNDMORE = int(zmq.SNDMORE)


def send(sock: zmq.Socket[Any], frames: Sequence[Buffer], idents: Sequence[bytes] = ()) -> None:
    """Send packed frames; large buffers go without a copy (pyzmq copies small ones).

    Frame by frame with plain int flags: ``send_multipart`` checks every
    part's type and ORs ``enum.Flag`` values per frame, which showed in
    the controller's profile as a tenth of its time.
    """
    parts = [*idents, *frames]
    last = parts.pop()
    for part in parts:
        sock.send(part, _SNDMORE, copy=False)
    sock.send(last, 0, copy=False)
