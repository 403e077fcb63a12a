"""Generate bad wire messages in bulk for the fuzz tests, and count what was sent.

Hypothesis draws a small recipe (a seed and a few faults); each recipe
expands, through a seeded ``random.Random``, into ``BATCH_SIZE`` messages,
so 100,000 messages cost a few hundred examples, not 100,000. Every
message that a receiver must refuse carries, as a signed buffer, a pickle
that creates ``marker`` if it is ever loaded: a test asserts the file never
appears. Signed messages of a known type always have one field a receiver
reads broken (missing or of the wrong type), so none of them can be run.
"""

from __future__ import annotations

import os
import pickle
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from jupyter_dist.protocol import DELIM, PROTOCOL_VERSION, Buffer, MsgType, Session, new_id

BATCH_SIZE = 250
# Messages per socket kind: `make fuzz` sets 100,000; `make test` runs this many.
TARGET_MESSAGES = int(os.environ.get("JUPYTER_DIST_FUZZ_MESSAGES", "3000"))


class _LoadMarker:
    """Unpickling this creates a file: proof that something loaded what it should have dropped."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "a"))


def marker_pickle(path: Path) -> bytes:
    return pickle.dumps(_LoadMarker(path), protocol=5)


def _broken(rng: random.Random) -> Any:
    """A value of a type no field has: a field set to it is malformed."""
    # No str, no int, no list of either: each fails every field it replaces.
    return rng.choice([[["x"]], 3.5, b"\x00bytes", [None, {}], True, {"": b""}])


# A well-formed content per type (before one of its fields is broken), and the fields to break.
_TEMPLATES: dict[MsgType, tuple[dict[str, Any], tuple[str, ...]]] = {
    MsgType.TASK_REQUEST: (
        {"task_id": "t", "kind": "apply", "target": None, "sources": {}},
        ("task_id", "kind", "target", "sources"),
    ),
    MsgType.TASK_REPLY: ({"task_id": "t", "status": "ok", "engine_id": 0}, ("task_id", "status")),
    MsgType.RESULT_REPLY: ({"task_id": "t", "status": "ok"}, ("task_id", "status")),
    MsgType.STREAM: ({"task_id": "t", "engine_id": 0, "name": "stdout", "text": "x"}, ("text",)),
    MsgType.DISPLAY_DATA: ({"task_id": "t", "engine_id": 0, "data": {}, "metadata": {}}, ("data",)),
    MsgType.REGISTER_REQUEST: ({"pid": 1, "host": "h", "requested_id": None}, ("pid", "host")),
    MsgType.REGISTER_REPLY: ({"status": "ok", "engine_id": 7}, ("status", "engine_id")),
    MsgType.HEARTBEAT_REQUEST: ({"engine_id": 0, "metrics": {}}, ("metrics",)),
    MsgType.ACTOR_STATE: ({"actor_id": "a", "state": {}}, ("actor_id",)),
    MsgType.RESULT_REQUEST: ({"task_ids": ["t"]}, ("task_ids",)),
    MsgType.CANCEL_REQUEST: ({"task_ids": ["t"]}, ("task_ids",)),
    MsgType.STEAL_REQUEST: ({"task_ids": ["t"]}, ("task_ids",)),
    MsgType.STEAL_REPLY: ({"asked": ["t"], "task_ids": ["t"]}, ("asked", "task_ids")),
    MsgType.INTERRUPT_REQUEST: ({"task_ids": None, "engine_ids": [99]}, ("engine_ids",)),
    MsgType.RESTART_REQUEST: ({"engine_ids": [99]}, ("engine_ids",)),
    MsgType.HISTORY_REQUEST: ({"limit": 10}, ("limit",)),
    MsgType.STATE: ({"seq": 1, "engines": []}, ("seq", "engines")),
    MsgType.STATUS_REPLY: ({"seq": 1, "engines": []}, ("seq", "engines")),
}

# The breakable fields that are required: removing an optional field leaves a valid message.
_REQUIRED = {"task_id", "kind", "status", "pid", "host", "actor_id", "task_ids", "asked", "seq"}

FAULTS = (
    "random_frames",
    "forged",
    "truncated",
    "reordered",
    "flipped_byte",
    "bad_version",
    "unknown_type",
    "huge_buffer_sizes",
    "missing_buffers",
    "malformed_content",
    "bad_parent",
    "broken_batch",
    "replayed",
)


@dataclass(frozen=True)
class Recipe:
    """What hypothesis draws: a seed and the faults to mix into one batch."""

    seed: int
    faults: tuple[str, ...]
    types: tuple[MsgType, ...]


def recipes(types: tuple[MsgType, ...]) -> st.SearchStrategy[Recipe]:
    return st.builds(
        Recipe,
        seed=st.integers(0, 2**32 - 1),
        faults=st.lists(st.sampled_from(FAULTS), min_size=1, max_size=5, unique=True).map(tuple),
        types=st.lists(st.sampled_from(types), min_size=1, max_size=4, unique=True).map(tuple),
    )


@dataclass
class Generator:
    """Turns recipes into wire frames (from the delimiter on, or anything at all)."""

    key: bytes
    marker: Path
    session: Session = field(init=False)
    forger: Session = field(init=False)
    payload: bytes = field(init=False)
    last_signed: list[Buffer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.session = Session(self.key)
        self.forger = Session(os.urandom(32))
        self.payload = marker_pickle(self.marker)

    def batch(self, recipe: Recipe) -> list[list[Buffer]]:
        rng = random.Random(recipe.seed)
        return [
            self._one(rng, rng.choice(recipe.faults), rng.choice(recipe.types))
            for _ in range(BATCH_SIZE)
        ]

    def _header(self, msg_type: str, sizes: list[int], n_signed: int, **changes: Any) -> bytes:
        header = {
            "msg_id": new_id(),
            "msg_type": msg_type,
            "session": self.session.session_id,
            "version": PROTOCOL_VERSION,
            "date": time.time(),
            "signed_buffers": n_signed,
            "buffer_sizes": sizes,
            **changes,
        }
        return msgpack.packb(header)

    def _broken_content(self, rng: random.Random, msg_type: MsgType) -> dict[str, Any]:
        template, breakable = _TEMPLATES[msg_type]
        content = dict(template)
        name = rng.choice(breakable)
        if rng.random() < 0.3 and name in _REQUIRED:
            del content[name]  # only a required one: without an optional one it is well formed
        else:
            content[name] = _broken(rng)
        return content

    def _signed(
        self,
        rng: random.Random,
        msg_type: str,
        content: Any,
        parent: Any = None,
        session: Session | None = None,
        **header_changes: Any,
    ) -> list[Buffer]:
        """A signed message with the marker as its signed buffer and random raw ones."""
        raw = [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(0, 3))]
        buffers = [self.payload, *raw]
        header = self._header(msg_type, [len(b) for b in buffers], 1, **header_changes)
        body = [header, msgpack.packb(parent or {}), msgpack.packb({}), msgpack.packb(content)]
        signature = (session or self.session)._sign([*body, self.payload])
        self.last_signed = [DELIM, signature, *body, *buffers]
        return self.last_signed

    def _bad_but_signed(self, rng: random.Random, msg_type: MsgType) -> list[Buffer]:
        return self._signed(rng, msg_type, self._broken_content(rng, msg_type))

    def _one(self, rng: random.Random, fault: str, msg_type: MsgType) -> list[Buffer]:
        make: Callable[[random.Random, MsgType], list[Buffer]] = getattr(self, f"_{fault}")
        return make(rng, msg_type)

    # ---- the faults ----------------------------------------------------

    def _random_frames(self, rng: random.Random, msg_type: MsgType) -> list[Buffer]:
        frames: list[Buffer] = [
            rng.randbytes(rng.randrange(0, 80)) for _ in range(rng.randrange(1, 10))
        ]
        if rng.random() < 0.5:
            frames.insert(rng.randrange(len(frames)), DELIM)
        return frames

    def _forged(self, rng: random.Random, msg_type: MsgType) -> list[Buffer]:
        return self._signed(rng, msg_type, self._broken_content(rng, msg_type), session=self.forger)

    def _truncated(self, rng: random.Random, msg_type: MsgType) -> list[Buffer]:
        frames = self._bad_but_signed(rng, msg_type)
        if rng.random() < 0.5:
            return frames[: rng.randrange(1, len(frames))]
        victim = rng.randrange(1, len(frames))
        cut = list(frames)
        cut[victim] = bytes(frames[victim])[: rng.randrange(0, max(1, len(frames[victim])))]  # type: ignore[arg-type]
        return cut

    def _reordered(self, rng: random.Random, msg_type: MsgType) -> list[Buffer]:
        frames = self._bad_but_signed(rng, msg_type)
        rest = frames[1:]
        while rest == frames[1:]:
            rng.shuffle(rest)
            if len(rest) < 2:
                break
        return [frames[0], *rest] if rng.random() < 0.7 else rng.sample(frames, len(frames))

    def _flipped_byte(self, rng: random.Random, msg_type: MsgType) -> list[Buffer]:
        frames = self._bad_but_signed(rng, msg_type)
        index = rng.randrange(1, 7)
        frame = bytearray(frames[index])  # type: ignore[arg-type]
        if frame:
            frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
        frames[index] = bytes(frame)
        return frames

    def _bad_version(self, rng: random.Random, msg_type: MsgType) -> list[Buffer]:
        version = rng.choice([0, 2, -1, 2**40, "1", None, 1.5, [1]])
        return self._signed(rng, msg_type, self._broken_content(rng, msg_type), version=version)

    def _unknown_type(self, rng: random.Random, msg_type: MsgType) -> list[Buffer]:
        name = rng.choice(["", "execute_request", "batch_reply", "TASK_REQUEST", rng.randbytes(6)])
        return self._signed(rng, name, {"task_id": "t", "kind": "apply"})  # type: ignore[arg-type]

    def _huge_buffer_sizes(self, rng: random.Random, msg_type: MsgType) -> list[Buffer]:
        sizes = [rng.choice([2**62, 2**31, -1, 10**15]), rng.choice([0, 2**63 - 1])]
        header = self._header(msg_type, sizes, rng.choice([1, 2, -1, 2**40]))
        body = [header, msgpack.packb({}), msgpack.packb({}), msgpack.packb({})]
        return [DELIM, self.session._sign([*body, self.payload]), *body, self.payload, b"x"]

    def _missing_buffers(self, rng: random.Random, msg_type: MsgType) -> list[Buffer]:
        frames = self._bad_but_signed(rng, msg_type)
        return frames[:6] + frames[7:] if rng.random() < 0.5 else [*frames, b"extra buffer"]

    def _malformed_content(self, rng: random.Random, msg_type: MsgType) -> list[Buffer]:
        return self._bad_but_signed(rng, msg_type)

    def _bad_parent(self, rng: random.Random, msg_type: MsgType) -> list[Buffer]:
        parent = rng.choice([{"msg_id": ["m"]}, {"msg_id": {"a": 1}}, {"msg_id": 5}])
        return self._signed(rng, MsgType.STATUS_REPLY, {"seq": 1, "engines": []}, parent)

    def _broken_batch(self, rng: random.Random, msg_type: MsgType) -> list[Buffer]:
        template = _TEMPLATES[msg_type][0]
        inner_header = self._header(msg_type, [len(self.payload)], 1)
        good = [inner_header, msgpack.packb({}), msgpack.packb({}), msgpack.packb(template)]
        bad = [
            self._header(msg_type, [len(self.payload)], 1),
            msgpack.packb({}),
            msgpack.packb({}),
            msgpack.packb(self._broken_content(rng, msg_type)),
        ]
        nested = [self._header("batch", [], 0), msgpack.packb({}), msgpack.packb({}), b"\x80"]
        messages = rng.choice(
            [
                "not a list",
                [good[:3]],
                [good, good],  # claims two signed buffers, the batch has one
                [[b"\xc1", *good[1:]]],
                [nested],
                [bad],
                [good, bad],
                [[1, 2, 3, 4]],
                [good, [self._header(msg_type, [], 0, version=9), *good[1:]]],
            ]
        )
        header = self._header("batch", [len(self.payload)], 1)
        body = [header, msgpack.packb({}), msgpack.packb({}), msgpack.packb({"messages": messages})]
        return [DELIM, self.session._sign([*body, self.payload]), *body, self.payload]

    def _replayed(self, rng: random.Random, msg_type: MsgType) -> list[Buffer]:
        # Well-signed bytes sent before, again: refused as a replay.
        return list(self.last_signed) or self._bad_but_signed(rng, msg_type)


def fuzz(
    generator: Generator,
    types: tuple[MsgType, ...],
    send_batch: Callable[[list[list[Buffer]]], None],
    target: int = TARGET_MESSAGES,
) -> int:
    """Send at least ``target`` generated messages through ``send_batch``; return how many."""
    sent = 0
    examples = -(-target // BATCH_SIZE)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # no shrinking: a failure is a process's state, kept as it is
        suppress_health_check=list(HealthCheck),
    )
    @given(recipe=recipes(types))
    def run(recipe: Recipe) -> None:
        nonlocal sent
        messages = generator.batch(recipe)
        send_batch(messages)
        sent += len(messages)

    while sent < target:  # hypothesis may stop early once it has tried every distinct recipe
        run()
    return sent
