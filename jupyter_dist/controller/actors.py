"""Know the cluster's actors: where each lives, its name, its calls in flight, its last state.

Pure bookkeeping: the controller routes the messages.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jupyter_dist.controller.registry import EngineRecord
from jupyter_dist.protocol import Message


@dataclass(slots=True, eq=False)
class ActorRecord:
    """One actor; ``create`` is kept so the actor can be made again after its engine dies."""

    actor_id: str
    class_name: str
    name: str | None
    methods: list[str]
    engine_id: int
    create: Message
    max_restarts: int = 0
    restarts: int = 0
    created: float = field(default_factory=time.time)
    pending: set[str] = field(default_factory=set)
    calls_done: int = 0
    state: dict[str, Any] | None = None
    death: str = ""  # why it is gone; empty while it lives

    @property
    def label(self) -> str:
        return self.name or self.class_name

    def describe(self) -> dict[str, Any]:
        return {
            "actor_id": self.actor_id,
            "class_name": self.class_name,
            "name": self.name,
            "methods": self.methods,
            "engine_id": self.engine_id,
            "pending": len(self.pending),
            "calls_done": self.calls_done,
            "restarts": self.restarts,
            "state": self.state,
        }


class ActorRegistry:
    """Living actors by id and by name."""

    def __init__(self) -> None:
        self._by_id: dict[str, ActorRecord] = {}
        self._by_name: dict[str, str] = {}
        self._deaths: dict[str, str] = {}  # actor id -> why it is gone

    def add(self, record: ActorRecord) -> None:
        self._by_id[record.actor_id] = record
        if record.name:
            self._by_name[record.name] = record.actor_id

    def get(self, actor_id: str) -> ActorRecord | None:
        return self._by_id.get(actor_id)

    def by_name(self, name: str) -> ActorRecord | None:
        actor_id = self._by_name.get(name)
        return self._by_id.get(actor_id) if actor_id else None

    def on_engine(self, engine_id: int) -> list[ActorRecord]:
        return [a for a in self._by_id.values() if a.engine_id == engine_id]

    def remove(self, record: ActorRecord, death: str) -> None:
        """The actor is gone: later calls fail with ``death`` as the reason."""
        record.death = death
        self._deaths[record.actor_id] = death
        self._by_id.pop(record.actor_id, None)
        if record.name and self._by_name.get(record.name) == record.actor_id:
            del self._by_name[record.name]

    def death_of(self, actor_id: str) -> str:
        return self._deaths.get(actor_id, f"there is no actor {actor_id[:8]} in this cluster")

    def all(self) -> list[ActorRecord]:
        return sorted(self._by_id.values(), key=lambda a: a.created)

    def count_on(self, engine_id: int) -> int:
        return sum(1 for a in self._by_id.values() if a.engine_id == engine_id)


def place(
    engines: Sequence[EngineRecord], actors: ActorRegistry, allowed: Sequence[int] | None
) -> EngineRecord | None:
    """The least busy engine for a new actor: fewest actors, then least outstanding work."""
    candidates = [e for e in engines if allowed is None or e.engine_id in allowed]
    if not candidates:
        return None
    return min(
        candidates, key=lambda e: (actors.count_on(e.engine_id), len(e.in_flight), e.engine_id)
    )
