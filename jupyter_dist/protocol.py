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

Several messages to the same peer in one turn of a process's loop travel
as one ``batch`` message (see ``outbox.py``): its content lists each
message's four packed maps, its buffers are theirs, signed buffers first,
and one signature covers them all. ``unpack_or_drop`` gives the messages
back one by one, checked like single ones, so only the wire knows of it.

A signature proves who sent a message, not that its content is sound: a
receiver also drops a message whose content lacks a field it reads, or
holds one of the wrong type (``check_content``), so no handler meets a
``task_id`` that is a list, and no engine unpickles the payload of a
request it could not run.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
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
    MEMORY_EXCEEDED = "memory_exceeded"  # engine -> controller: over its memory limit, stop it
    ENGINES_CHANGED = "engines_changed"  # controller -> engine: engines joined or died
    CONNECT_REQUEST = "connect_request"  # client -> controller
    CONNECT_REPLY = "connect_reply"
    STATUS_REQUEST = "status_request"
    STATUS_REPLY = "status_reply"
    RESULT_REQUEST = "result_request"
    RESULT_REPLY = "result_reply"
    RESULT_ACK = "result_ack"  # client -> controller: it has these results; no reply
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
    BATCH = "batch"  # several messages to one peer, signed once (never nested)


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
class Envelope:
    """A message ready to go: its four maps packed, its buffers as given or received.

    It is signed when it is sent, alone or in a batch. One that arrived alone
    keeps its signature, so forwarding it unchanged costs no new HMAC.
    """

    body: list[Buffer]  # header, parent, metadata, content (msgpack)
    signed: list[Buffer]
    raw: list[Buffer]
    signature: bytes | None = None


@dataclass(slots=True)
class Message:
    """A parsed, verified message. ``envelope`` keeps it as it came, for forwarding."""

    header: Header
    parent: dict[str, Any]
    metadata: dict[str, Any]
    content: dict[str, Any]
    buffers: list[memoryview]
    envelope: Envelope = field(repr=False)

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
_BATCHED_TYPES = _KNOWN_TYPES - {MsgType.BATCH.value}


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
    return _as_view(buf).nbytes


def _as_view(buf: Buffer) -> memoryview:
    # A zmq.Frame exports its bytes without a copy, though its type stubs do not say so.
    return memoryview(buf)  # type: ignore[arg-type]


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

    def envelope(
        self,
        msg_type: MsgType,
        content: dict[str, Any],
        parent: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        signed_buffers: Sequence[Buffer] = (),
        raw_buffers: Sequence[Buffer] = (),
        msg_id: str | None = None,
    ) -> Envelope:
        """Pack a new message's maps; it is signed when it is sent (``frames``)."""
        header: Header = {
            "msg_id": msg_id or new_id(),
            "msg_type": str(msg_type),
            "session": self.session_id,
            "version": PROTOCOL_VERSION,
            "date": time.time(),
            "signed_buffers": len(signed_buffers),
            "buffer_sizes": [_nbytes(b) for b in (*signed_buffers, *raw_buffers)],
        }
        body: list[Buffer] = [
            msgpack.packb(header),
            msgpack.packb(parent or {}),
            msgpack.packb(metadata or {}),
            msgpack.packb(content),
        ]
        return Envelope(body, list(signed_buffers), list(raw_buffers))

    def frames(self, envelopes: Sequence[Envelope]) -> list[Buffer]:
        """The wire frames, from the delimiter on, of one message or of a batch of several."""
        if len(envelopes) == 1:
            env = envelopes[0]
            signature = env.signature or self._sign([*env.body, *env.signed])
            return [DELIM, signature, *env.body, *env.signed, *env.raw]
        return self.pack(
            MsgType.BATCH,
            {"messages": [env.body for env in envelopes]},
            signed_buffers=[b for env in envelopes for b in env.signed],
            raw_buffers=[b for env in envelopes for b in env.raw],
        )

    def pack(self, msg_type: MsgType, content: dict[str, Any], **options: Any) -> list[Buffer]:
        """The frames of one new message, from the delimiter on; ``options`` as for ``envelope``."""
        return self.frames([self.envelope(msg_type, content, **options)])

    def unpack(self, frames: Sequence[Buffer]) -> tuple[list[bytes], Message]:
        """Split routing ids from a verified message; raise ProtocolError on any fault.

        A batch comes back as one message of type ``batch``: ``split`` opens it.
        """
        for i, frame in enumerate(frames):
            if _nbytes(frame) == len(DELIM) and _as_view(frame).tobytes() == DELIM:
                delim = i
                break
        else:
            raise ProtocolError("no delimiter frame: not a jupyter-dist message")
        idents = [_as_view(f).tobytes() for f in frames[:delim]]
        rest = frames[delim + 1 :]
        if len(rest) < 5:
            raise ProtocolError(
                f"truncated message: {len(rest)} frames after the delimiter, need 5"
            )
        signature = _as_view(rest[0]).tobytes()
        body: list[Buffer] = [_as_view(f) for f in rest[1:5]]
        header = _read_header(body[0])
        buffers = list(rest[5:])
        signed_count = header["signed_buffers"]
        if len(buffers) != len(header["buffer_sizes"]) or not 0 <= signed_count <= len(buffers):
            raise ProtocolError(
                f"header announces {len(header['buffer_sizes'])} buffers, message has {len(buffers)}"
            )
        expected = self._sign([*body, *buffers[:signed_count]])
        if not hmac.compare_digest(expected, signature):
            raise ProtocolError("bad signature: the message was not signed with this cluster's key")
        if signature in self._seen:
            raise ProtocolError("replayed message: this signature was seen before")
        self._remember(signature)
        envelope = Envelope(body, buffers[:signed_count], buffers[signed_count:], signature)
        return idents, _read_message(header, envelope, _KNOWN_TYPES)

    def split(self, msg: Message) -> list[Message]:
        """The messages a verified batch carries (checked like single ones), or ``[msg]``."""
        if msg.msg_type != MsgType.BATCH:
            return [msg]
        bodies = msg.content.get("messages")
        if not isinstance(bodies, list):
            raise ProtocolError("a batch must list its messages")
        signed, raw = msg.envelope.signed, msg.envelope.raw
        next_signed = next_raw = 0  # the first buffers not yet given to a message
        messages = []
        for body in bodies:
            if not (isinstance(body, list) and len(body) == 4):
                raise ProtocolError("a batch must list each message as its four packed maps")
            header = _read_header(body[0])
            n_signed = header["signed_buffers"]
            n_raw = len(header["buffer_sizes"]) - n_signed
            end_signed, end_raw = next_signed + n_signed, next_raw + n_raw
            if n_signed < 0 or n_raw < 0 or end_signed > len(signed) or end_raw > len(raw):
                raise ProtocolError("a message in a batch claims buffers the batch lacks")
            envelope = Envelope(body, signed[next_signed:end_signed], raw[next_raw:end_raw])
            next_signed, next_raw = end_signed, end_raw
            messages.append(_read_message(header, envelope, _BATCHED_TYPES))
        if next_signed != len(signed) or next_raw != len(raw):
            raise ProtocolError("a batch carries buffers none of its messages claims")
        return messages

    def _remember(self, signature: bytes) -> None:
        self._seen.add(signature)
        self._seen_order.append(signature)
        if len(self._seen_order) > REPLAY_HISTORY:
            self._seen.discard(self._seen_order.popleft())


def _read_header(packed: Buffer) -> Header:
    """Decode a header far enough to check a signature: it must say its buffer counts."""
    try:
        header = msgpack.unpackb(packed)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError(f"unreadable header: {e}") from e
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    if not isinstance(header.get("signed_buffers"), int) or not isinstance(
        header.get("buffer_sizes"), list
    ):
        raise ProtocolError("header lacks buffer counts")
    return cast(Header, header)


def _read_message(header: Header, envelope: Envelope, allowed_types: frozenset[str]) -> Message:
    """Check a signed message's header against its buffers and decode its body."""
    if header.get("version") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {header.get('version')!r}, this process speaks "
            f"{PROTOCOL_VERSION}: install the same jupyter-dist everywhere"
        )
    if header.get("msg_type") not in allowed_types:
        raise ProtocolError(f"unknown message type {header.get('msg_type')!r}")
    buffers = [_as_view(b) for b in (*envelope.signed, *envelope.raw)]
    for buf, size in zip(buffers, header["buffer_sizes"], strict=True):
        if buf.nbytes != size:
            raise ProtocolError(f"buffer of {buf.nbytes} bytes, header says {size}")
    body = envelope.body
    try:
        parent = msgpack.unpackb(body[1])
        metadata = msgpack.unpackb(body[2])
        content = msgpack.unpackb(body[3])
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError(f"unreadable message body: {e}") from e
    if not (isinstance(parent, dict) and isinstance(metadata, dict) and isinstance(content, dict)):
        raise ProtocolError("parent, metadata and content must be maps")
    return Message(header, parent, metadata, content, buffers, envelope)


Check = Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_map(value: Any) -> bool:
    return isinstance(value, dict)


def _is_list(value: Any) -> bool:
    return isinstance(value, list)


def _optional(check: Check) -> Check:
    return lambda value: value is None or check(value)


def _list_of(check: Check) -> Check:
    return lambda value: isinstance(value, list) and all(check(item) for item in value)


def _is_json(value: Any) -> bool:
    """Whether ``value`` is made of what JSON holds (monitors send states on as JSON).

    A loop, not recursion: msgpack nests deeper than Python's recursion limit.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                return False
            stack.extend(item.values())
        elif not (item is None or isinstance(item, str | int | float | bool)):
            return False
    return True


def _is_engine_entry(value: Any) -> bool:
    return (
        isinstance(value, dict) and _is_int(value.get("engine_id")) and _is_str(value.get("state"))
    )


TASK_KINDS = frozenset(
    {"execute", "apply", "push", "pull", "actor_create", "actor_call", "actor_kill"}
)


@dataclass(frozen=True, slots=True)
class _Fields:
    """The content fields of one message type that receivers read: a test each, some required."""

    checks: dict[str, Check]
    required: tuple[str, ...] = ()


_TASK_IDS = _list_of(_is_str)
_STATE = _Fields({"seq": _is_int, "engines": _list_of(_is_engine_entry)}, ("seq", "engines"))
_TASK_RESULT = _Fields(
    {
        "task_id": _is_str,
        "status": _is_str,
        "engine_id": _optional(_is_int),
        "error": _is_map,
        "shm": _is_list,
    },
    ("task_id", "status"),
)
_OUTPUT = _Fields({"task_id": _is_str, "engine_id": _optional(_is_int)})
_CONTENT_FIELDS: dict[str, _Fields] = {
    MsgType.TASK_REQUEST: _Fields(
        {
            "task_id": _is_str,
            "kind": lambda kind: isinstance(kind, str) and kind in TASK_KINDS,
            "target": _optional(_is_int),
            "allowed": _optional(_list_of(_is_int)),
            "shm": _is_list,
            "sources": lambda sources: (
                _is_map(sources) and all(_is_str(k) and _is_str(v) for k, v in sources.items())
            ),
            "code": _is_str,
            "execution_count": _optional(_is_int),
            "names": _list_of(_is_str),
            "actor_id": _is_str,
            "method": _is_str,
            "max_concurrency": _is_int,
            "max_restarts": _is_int,
            "methods": _list_of(_is_str),
            "retries": _is_int,
            "shm_receivers": lambda n: _is_int(n) and n > 0,
        },
        ("task_id", "kind"),
    ),
    MsgType.TASK_REPLY: _TASK_RESULT,
    MsgType.RESULT_REPLY: _TASK_RESULT,
    MsgType.STREAM: _Fields({**_OUTPUT.checks, "name": _is_str, "text": _is_str}),
    MsgType.DISPLAY_DATA: _Fields({**_OUTPUT.checks, "data": _is_map, "metadata": _is_map}),
    MsgType.EXECUTE_RESULT: _Fields({**_OUTPUT.checks, "data": _is_map, "metadata": _is_map}),
    MsgType.REGISTER_REQUEST: _Fields(
        {"pid": _is_int, "host": _is_str, "requested_id": _optional(_is_int)}, ("pid", "host")
    ),
    MsgType.REGISTER_REPLY: _Fields(
        {"status": _is_str, "engine_id": _is_int, "n_engines": _is_int}, ("status",)
    ),
    MsgType.ENGINES_CHANGED: _Fields({"n_engines": _is_int}, ("n_engines",)),
    MsgType.HEARTBEAT_REQUEST: _Fields({"metrics": lambda m: _is_map(m) and _is_json(m)}),
    MsgType.MEMORY_EXCEEDED: _Fields({"rss_bytes": _is_int}, ("rss_bytes",)),
    MsgType.ACTOR_STATE: _Fields({"actor_id": _is_str, "state": _is_json}, ("actor_id",)),
    MsgType.RESULT_REQUEST: _Fields({"task_ids": _TASK_IDS}, ("task_ids",)),
    MsgType.RESULT_ACK: _Fields({"task_ids": _TASK_IDS}, ("task_ids",)),
    MsgType.CANCEL_REQUEST: _Fields({"task_ids": _TASK_IDS}, ("task_ids",)),
    MsgType.STEAL_REQUEST: _Fields({"task_ids": _TASK_IDS}, ("task_ids",)),
    MsgType.STEAL_REPLY: _Fields(
        {"asked": _TASK_IDS, "task_ids": _TASK_IDS}, ("asked", "task_ids")
    ),
    MsgType.INTERRUPT_REQUEST: _Fields(
        {"task_ids": _optional(_TASK_IDS), "engine_ids": _optional(_list_of(_is_int))}
    ),
    MsgType.RESTART_REQUEST: _Fields({"engine_ids": _list_of(_is_int)}, ("engine_ids",)),
    MsgType.HISTORY_REQUEST: _Fields({"limit": _is_int}),
    MsgType.STATE: _STATE,
    MsgType.STATUS_REPLY: _STATE,
    MsgType.CONNECT_REPLY: _STATE,
}
# Fields a task_request of each kind must have besides its id and kind.
_KIND_FIELDS = {
    "execute": ("code",),
    "pull": ("names",),
    "actor_create": ("actor_id",),
    "actor_call": ("actor_id", "method"),
    "actor_kill": ("actor_id",),
}


def check_content(msg: Message) -> None:
    """Raise ProtocolError unless the fields receivers read are there and of the right type.

    Run on every received message, after its signature: handlers may then
    index what is required, and what is optional is None or well typed.
    """
    if not (_is_str(msg.header.get("msg_id")) and _is_str(msg.header.get("session"))):
        raise ProtocolError("the header's msg_id and session must be strings")
    if not _is_str(msg.parent.get("msg_id", "")):
        raise ProtocolError("the parent's msg_id must be a string")
    fields = _CONTENT_FIELDS.get(msg.msg_type)
    if fields is None:
        return
    content = msg.content
    required = fields.required
    if msg.msg_type == MsgType.TASK_REQUEST:
        required += _KIND_FIELDS.get(content.get("kind"), ())  # type: ignore[arg-type]
    for name in required:
        if name not in content:
            raise ProtocolError(f"a {msg.msg_type} without its {name!r}")
    for name, check in fields.checks.items():
        if name in content and not check(content[name]):
            raise ProtocolError(
                f"a {msg.msg_type} whose {name!r} is a malformed {type(content[name]).__name__}"
            )
    if fields is _STATE and not _is_json(content):
        raise ProtocolError(f"a {msg.msg_type} holding values that JSON cannot carry")


def unpack_or_drop(
    session: Session, frames: Sequence[Buffer], peer: str
) -> tuple[list[bytes], list[Message]] | None:
    """Unpack a received message (a batch: its messages), or log one warning and return None.

    A batch with one malformed message is dropped whole: its sender is broken.
    """
    try:
        idents, msg = session.unpack(frames)
        messages = session.split(msg)
        for each in messages:
            check_content(each)
        return idents, messages
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
