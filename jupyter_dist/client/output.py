"""Show engine output where the work was started: its notebook cell, or this terminal.

Output is routed by the parent header of the cell that submitted the work
(captured at submission), never by "whichever cell runs now", so output of
``block=False`` work lands in its own cell. Lines are tagged with their
engine; a line that every engine of a broadcast printed alike is shown
once, tagged with the range (``[0-3] epoch 1``). To see that, a line waits
until each engine still running has printed its line at the same position,
or ``ALIGN_WAIT_S`` at most (``FIRST_LINE_WAIT_S`` while an engine has not
printed at all yet). Runs on the client's I/O thread.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

ALIGN_WAIT_S = 0.5
FIRST_LINE_WAIT_S = 2.0

# (delay_s, callback) -> schedules a call on the I/O thread.
CallLater = Callable[[float, Callable[[], None]], object]


def engine_tag(engine_ids: Sequence[int]) -> str:
    """``[0-3]`` for a run of ids, ``[0,2]`` otherwise, ``[1]`` for one."""
    ids = sorted(engine_ids)
    if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"[{ids[0]}-{ids[-1]}]"
    return "[" + ",".join(str(i) for i in ids) + "]"


def _kernel() -> Any:
    """The ipykernel kernel this client runs in, or None (a script, a terminal)."""
    if "ipykernel" not in sys.modules:
        return None
    from ipykernel.kernelbase import Kernel

    return Kernel.instance() if Kernel.initialized() else None


def current_destination() -> dict[str, Any] | None:
    """The parent header of the cell running now (call on the kernel's main thread)."""
    kernel = _kernel()
    if kernel is None:
        return None
    parent = kernel.get_parent("shell")
    return dict(parent) if parent else None


@dataclass(eq=False)
class _EngineLines:
    complete: list[str] = field(default_factory=list)
    partial: str = ""
    since: float = 0.0


@dataclass(eq=False)
class OutputGroup:
    """The output of one call: one task per engine (a broadcast) or one task (submit, map)."""

    destination: dict[str, Any] | None
    engine_ids: list[int] | None  # a broadcast's engines; None: whichever engine runs it
    label: str = ""  # tags the output instead of engine ids (an actor's name)
    streams: dict[str, dict[int, _EngineLines]] = field(default_factory=dict)
    done_engines: set[int] = field(default_factory=set)
    open_tasks: int = 0  # a broadcast counts its engines from the start (see ``new_group``)
    is_flush_scheduled: bool = False


class OutputRouter:
    """Tags, merges and publishes engine output for the groups it is told about."""

    def __init__(self, call_later: CallLater) -> None:
        self._call_later = call_later
        self._groups: dict[str, OutputGroup] = {}

    def new_group(self, engine_ids: list[int] | None, label: str = "") -> OutputGroup:
        """A group for output of work submitted now, from this thread's cell."""
        group = OutputGroup(current_destination(), engine_ids, label)
        # Counted now, not as each task is registered on the I/O thread: one engine's
        # reply may come back before the next engine's task is even registered, and
        # the group would end early, showing that engine's lines unmerged.
        group.open_tasks = len(engine_ids) if engine_ids is not None else 0
        return group

    def add_task(self, task_id: str, group: OutputGroup) -> None:
        if group.engine_ids is None:
            group.open_tasks += 1
        self._groups[task_id] = group

    def on_stream(self, task_id: str, engine_id: int, name: str, text: str) -> None:
        group = self._groups.get(task_id)
        if group is None:
            return
        lines = group.streams.setdefault(name, {}).setdefault(engine_id, _EngineLines())
        *complete, lines.partial = (lines.partial + text).split("\n")
        if complete:
            if not lines.complete:
                lines.since = time.monotonic()
            lines.complete.extend(complete)
            self._emit(group, name, aligned_only=True)
            self._schedule_flush(group)

    def on_display(
        self,
        task_id: str,
        engine_id: int,
        msg_type: str,
        data: dict[str, Any],
        metadata: dict[str, Any],
    ) -> None:
        group = self._groups.get(task_id)
        if group is None:
            return
        self._flush(group)
        if msg_type == "execute_result":
            prompt = f"Out[{engine_id}:{metadata.get('execution_count', '')}]: "
        else:
            prompt = f"{self._tag(group, [engine_id])} "
        tagged = dict(data)
        if "text/plain" in tagged:
            tagged["text/plain"] = prompt + str(tagged["text/plain"])
        if "text/html" in tagged:
            tagged["text/html"] = f'<pre class="jd-prompt">{prompt.strip()}</pre>' + str(
                tagged["text/html"]
            )
        meta = {**metadata, "jupyter_dist": {"engine_id": engine_id}}
        _publish_display(group.destination, tagged, meta)

    def on_task_done(self, task_id: str, engine_id: int | None) -> None:
        group = self._groups.pop(task_id, None)
        if group is None:
            return
        group.open_tasks -= 1
        if engine_id is not None:
            group.done_engines.add(engine_id)
            for streams in group.streams.values():
                lines = streams.get(engine_id)
                if lines is not None and lines.partial:
                    lines.complete.append(lines.partial)
                    lines.partial = ""
        if group.open_tasks <= 0:
            self._flush(group)
        else:
            for name in group.streams:
                self._emit(group, name, aligned_only=True)

    @staticmethod
    def _tag(group: OutputGroup, engine_ids: list[int]) -> str:
        return f"[{group.label}]" if group.label else engine_tag(engine_ids)

    def _schedule_flush(self, group: OutputGroup) -> None:
        if group.is_flush_scheduled:
            return
        group.is_flush_scheduled = True

        def flush_stale() -> None:
            group.is_flush_scheduled = False
            now = time.monotonic()
            for name, streams in group.streams.items():
                wait_s = self._align_wait_s(group, streams)
                if any(ls.complete and now - ls.since >= wait_s for ls in streams.values()):
                    self._emit(group, name, aligned_only=False)
            if any(ls.complete for streams in group.streams.values() for ls in streams.values()):
                self._schedule_flush(group)

        self._call_later(ALIGN_WAIT_S, flush_stale)

    @staticmethod
    def _align_wait_s(group: OutputGroup, streams: dict[int, _EngineLines]) -> float:
        """How long a line waits for the same line from the other engines.

        Longer while an engine still running has printed nothing on this
        stream: engines start apart by more than lines drift apart later.
        """
        running = [e for e in group.engine_ids or [] if e not in group.done_engines]
        return FIRST_LINE_WAIT_S if any(e not in streams for e in running) else ALIGN_WAIT_S

    def _flush(self, group: OutputGroup) -> None:
        for name in group.streams:
            self._emit(group, name, aligned_only=False)

    def _emit(self, group: OutputGroup, name: str, aligned_only: bool) -> None:
        """Publish pending lines, merging a line that several engines printed alike at one position."""
        streams = group.streams.get(name, {})
        engines = group.engine_ids if group.engine_ids is not None else list(streams)
        out: list[str] = []
        while True:
            ready = [e for e in engines if e in streams and streams[e].complete]
            waiting = [e for e in engines if e not in group.done_engines or e in ready]
            if not ready or (aligned_only and len(ready) < len(waiting)):
                break
            by_text: dict[str, list[int]] = {}
            for engine_id in sorted(ready):
                lines = streams[engine_id]
                by_text.setdefault(lines.complete.pop(0), []).append(engine_id)
                lines.since = time.monotonic()
            out.extend(f"{self._tag(group, ids)} {text}\n" for text, ids in by_text.items())
        if out:
            _publish_stream(group.destination, name, "".join(out))


def _publish_stream(destination: dict[str, Any] | None, name: str, text: str) -> None:
    kernel = _kernel() if destination is not None else None
    if kernel is None:
        (sys.stderr if name == "stderr" else sys.stdout).write(text)
        return
    kernel.session.send(
        kernel.iopub_socket,
        "stream",
        {"name": name, "text": text},
        parent=destination,
        ident=f"stream.{name}".encode(),
    )


def _publish_display(
    destination: dict[str, Any] | None, data: dict[str, Any], metadata: dict[str, Any]
) -> None:
    kernel = _kernel() if destination is not None else None
    if kernel is None:
        sys.stdout.write(str(data.get("text/plain", "")) + "\n")
        return
    content = {"data": data, "metadata": metadata, "transient": {}}
    kernel.session.send(
        kernel.iopub_socket, "display_data", content, parent=destination, ident=b"display_data"
    )
