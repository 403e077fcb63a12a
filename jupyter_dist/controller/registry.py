"""Know which engines exist, how to reach them, and whether they are alive."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class EngineState(StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"


@dataclass(slots=True, eq=False)
class EngineRecord:
    """One engine as the controller sees it; ``in_flight`` runs in FIFO order on the engine."""

    engine_id: int
    ident: bytes
    pid: int
    host: str
    registered: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    in_flight: deque[str] = field(default_factory=deque)
    is_dead: bool = False
    exit_code: int | None = None
    process: Any = None  # a Popen-like handle when this controller started the engine
    metrics: dict[str, Any] = field(default_factory=dict)  # from the latest heartbeat
    heartbeats: int = 0  # received so far (the controller answers every few)
    cpu_s: float | None = None  # its CPU time when last read (only while it is silent)
    memory_limit_bytes: int | None = None  # its resident memory may not pass this
    # Why the controller stopped it, told to the askers of the work it held.
    death_details: dict[str, Any] = field(default_factory=dict)

    @property
    def state(self) -> EngineState:
        if self.is_dead:
            return EngineState.DEAD
        return EngineState.BUSY if self.in_flight else EngineState.IDLE

    def describe(self) -> dict[str, Any]:
        return {
            "engine_id": self.engine_id,
            "host": self.host,
            "pid": self.pid,
            "state": str(self.state),
            "task_id": self.in_flight[0] if self.in_flight else None,
            "queued": max(0, len(self.in_flight) - 1),
            "exit_code": self.exit_code,
            "registered": self.registered,
            "memory_limit_bytes": self.memory_limit_bytes,
            **self.metrics,
        }


class EngineRegistry:
    """Engines by id and by routing identity. Ids are never reused except on restart in place."""

    def __init__(self) -> None:
        self._by_id: dict[int, EngineRecord] = {}
        self._by_ident: dict[bytes, EngineRecord] = {}
        self._next_id = 0

    def register(
        self, ident: bytes, pid: int, host: str, requested_id: int | None, process: Any = None
    ) -> EngineRecord:
        """Add an engine; take ``requested_id`` when that slot is free or dead."""
        engine_id = requested_id
        old = self._by_id.get(engine_id) if engine_id is not None else None
        if engine_id is None or engine_id < 0 or (old is not None and not old.is_dead):
            engine_id = self._next_id
        self._next_id = max(self._next_id, engine_id + 1)
        if old is not None:
            self._by_ident.pop(old.ident, None)
        record = EngineRecord(engine_id, ident, pid, host, process=process)
        self._by_id[engine_id] = record
        self._by_ident[ident] = record
        return record

    def by_ident(self, ident: bytes) -> EngineRecord | None:
        return self._by_ident.get(ident)

    def by_id(self, engine_id: int) -> EngineRecord | None:
        return self._by_id.get(engine_id)

    def live(self) -> list[EngineRecord]:
        return [e for e in self._by_id.values() if not e.is_dead]

    def all(self) -> list[EngineRecord]:
        return sorted(self._by_id.values(), key=lambda e: e.engine_id)

    def mark_dead(self, record: EngineRecord, exit_code: int | None) -> None:
        record.is_dead = True
        record.exit_code = exit_code
        self._by_ident.pop(record.ident, None)
