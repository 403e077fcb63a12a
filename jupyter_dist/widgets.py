"""The live cluster monitor for notebooks, built from stock ipywidgets.

``c.monitor()`` and ``%dist monitor`` show it: a row per engine (state,
host, CPU, memory, a bar per GPU for utilisation and memory, the task at
hand), the actors with their state, and task counts. It is fed by the
client's state stream: the client's I/O thread hands each new state to
``ClusterMonitor``, which only keeps it and wakes a render thread of its
own; that thread redraws at most every ``interval_s`` inside
``hold_sync()``. So the monitor never touches zmq, never blocks the kernel,
and keeps updating while cells run on the engines (widget messages from a
thread go out through the kernel's IOPub thread).
"""

from __future__ import annotations

import contextlib
import html
import logging
import threading
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

if TYPE_CHECKING:
    from jupyter_dist.client.cluster import Cluster

logger = logging.getLogger(__name__)

REFRESH_INTERVAL_S = 0.5
STATE_STYLES = {"idle": "success", "busy": "info", "starting": "warning", "dead": "danger"}
COLUMNS = ("engine", "state", "host", "CPU", "memory", "GPUs", "task")


def format_bytes(nbytes: float | None) -> str:
    """``1536000000`` -> ``'1.5 GB'``; None -> ``'-'``."""
    if nbytes is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError("unreachable")


def _bar(max_value: int = 100, width: str = "110px") -> widgets.IntProgress:
    return widgets.IntProgress(value=0, min=0, max=max_value, layout=widgets.Layout(width=width))


def _label(text: str = "") -> widgets.HTML:
    return widgets.HTML(value=text)


class _GpuBars:
    """One GPU of one engine: its name, a utilisation bar and a memory bar."""

    def __init__(self) -> None:
        self.label = _label()
        self.utilization = _bar(width="80px")
        self.memory = _bar(width="80px")
        self.box = widgets.HBox([self.label, self.utilization, self.memory])

    def widgets(self) -> list[widgets.DOMWidget]:
        return [self.label, self.utilization, self.memory]

    def update(self, gpu: dict[str, Any]) -> None:
        utilization = gpu.get("utilization_percent") or 0
        used, total = gpu.get("memory_used_bytes"), gpu.get("memory_total_bytes")
        own = gpu.get("process_memory_bytes")
        temperature, power = gpu.get("temperature_c"), gpu.get("power_w")
        details = [f"{format_bytes(used)} / {format_bytes(total)}"]
        if own:
            details.append(f"this engine {format_bytes(own)}")
        if temperature is not None:
            details.append(f"{temperature} °C")
        if power is not None:
            details.append(f"{power:.0f} W")
        title = html.escape(f"{gpu.get('name', '')} {gpu.get('uuid', '')}", quote=True)
        self.label.value = f"<span title='{title}'>GPU {gpu.get('index')}: {utilization}%, {', '.join(details)}</span>"
        self.utilization.value = max(0, min(100, int(utilization)))
        self.memory.value = int(100 * used / total) if used is not None and total else 0


class _EngineRow:
    """The cells of one engine's row in the grid."""

    def __init__(self, n_gpus: int) -> None:
        self.engine = _label()
        self.state = _label()
        self.host = _label()
        self.cpu_bar = _bar()
        self.cpu = widgets.HBox([self.cpu_bar, _label()])
        self.memory = _label()
        self.gpus = [_GpuBars() for _ in range(n_gpus)]
        self.gpu_box = widgets.VBox([g.box for g in self.gpus] or [_label("-")])
        self.task = _label()

    def cells(self) -> list[widgets.DOMWidget]:
        return [self.engine, self.state, self.host, self.cpu, self.memory, self.gpu_box, self.task]

    def widgets(self) -> list[widgets.DOMWidget]:
        return [
            *self.cells(),
            self.cpu_bar,
            self.cpu.children[1],
            *(w for g in self.gpus for w in g.widgets()),
        ]

    def update(self, engine: dict[str, Any]) -> None:
        state = str(engine.get("state", ""))
        cpu = engine.get("cpu_percent")
        self.engine.value = f"<b>{engine['engine_id']}</b>"
        self.state.value = (
            f"<span class='jp-dist-state-{html.escape(state)}'>{html.escape(state)}</span>"
        )
        self.host.value = f"{html.escape(str(engine.get('host', '')))}:{engine.get('pid', '')}"
        self.cpu_bar.value = max(0, min(100, int(cpu or 0)))
        self.cpu_bar.bar_style = STATE_STYLES.get(state, "")
        self.cpu.children[1].value = "-" if cpu is None else f"{cpu:.0f}%"
        self.memory.value = format_bytes(engine.get("rss_bytes"))
        for bars, gpu in zip(self.gpus, engine.get("gpus") or [], strict=False):
            bars.update(gpu)
        task = engine.get("task_id")
        queued = engine.get("queued", 0)
        self.task.value = (
            f"{html.escape(str(task)[:8])}{f' (+{queued} queued)' if queued else ''}"
            if task
            else ""
        )


def _actors_html(actors: list[dict[str, Any]]) -> str:
    rows = "".join(
        "<tr>"
        f"<td>{html.escape(str(a.get('actor_id', ''))[:8])}</td>"
        f"<td>{html.escape(str(a.get('name') or a.get('class_name', '')))}</td>"
        f"<td>{a.get('engine_id', '')}</td>"
        f"<td>{a.get('pending', 0)}</td>"
        f"<td>{a.get('calls_done', 0)}</td>"
        f"<td><code>{html.escape(repr(a.get('state', {})))[:200]}</code></td>"
        "</tr>"
        for a in actors
    )
    return (
        "<b>Actors</b><table><tr><th>actor</th><th>class</th><th>engine</th>"
        f"<th>pending</th><th>done</th><th>state</th></tr>{rows}</table>"
    )


class ClusterMonitor(widgets.VBox):  # type: ignore[misc]  # ipywidgets is untyped
    """A live view of one cluster's engines, GPUs, actors and tasks.

    Parameters
    ----------
    cluster
        The cluster to follow; None makes a monitor that shows only what
        ``render`` is given.
    interval_s
        The shortest time between two redraws.

    Examples
    --------
    >>> c = jd.Cluster.start(n=2)
    >>> c.monitor()  # the last expression of a cell: the monitor shows below it
    """

    def __init__(
        self, cluster: Cluster | None = None, interval_s: float = REFRESH_INTERVAL_S
    ) -> None:
        self.header = _label()
        self.grid = widgets.GridBox(
            layout=widgets.Layout(
                grid_template_columns="50px 70px 150px 170px 90px minmax(200px, auto) 140px",
                grid_gap="2px 8px",
            )
        )
        self.actors = _label()
        super().__init__([self.header, self.grid, self.actors])
        self.add_class("jp-dist-Monitor")
        self.interval_s = interval_s
        self.engine_rows: dict[int, _EngineRow] = {}
        self._row_shapes: list[tuple[int, int]] = []  # (engine id, GPU count) as laid out
        self._cluster = cluster
        self._latest: dict[str, Any] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if cluster is not None:
            self.render(cluster.connection.state)
            cluster.connection.state_listeners.append(self._on_state)
            self._thread = threading.Thread(
                target=self._redraw_loop, name="jupyter-dist-monitor", daemon=True
            )
            self._thread.start()

    def _on_state(self, state: dict[str, Any]) -> None:
        """Keep the newest state and wake the render thread (client I/O thread: no drawing here)."""
        self._latest = state
        self._wake.set()

    def _redraw_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            state = self._latest
            if self._stop.is_set() or state is None:
                break
            try:
                self.render(state)
            except Exception:  # a thread boundary: log, keep following the cluster
                logger.exception("the monitor could not draw the cluster's state")
            self._stop.wait(self.interval_s)  # at most one redraw per interval

    def render(self, state: dict[str, Any]) -> None:
        """Show ``state`` (the controller's published state dict); one message per widget."""
        engines = sorted(state.get("engines", []), key=lambda e: e["engine_id"])
        shapes = [(e["engine_id"], len(e.get("gpus") or [])) for e in engines]
        if shapes != self._row_shapes:
            self.engine_rows = {engine_id: _EngineRow(n_gpus) for engine_id, n_gpus in shapes}
            self._row_shapes = shapes
            titles = [_label(f"<b>{title}</b>") for title in COLUMNS]
            self.grid.children = titles + [c for r in self.engine_rows.values() for c in r.cells()]
        with contextlib.ExitStack() as stack:
            for w in [
                self.header,
                self.actors,
                *(w for r in self.engine_rows.values() for w in r.widgets()),
            ]:
                stack.enter_context(w.hold_sync())
            tasks = state.get("tasks", {})
            live = sum(1 for e in engines if e.get("state") != "dead")
            self.header.value = (
                f"<b>cluster {html.escape(str(state.get('cluster_id', '?')))}</b>: "
                f"{live} of {len(engines)} engines alive; tasks: {tasks.get('done', 0)} done, "
                f"{tasks.get('pending', 0)} pending ({tasks.get('queued', 0)} queued), "
                f"{tasks.get('failed', 0)} failed"
            )
            for engine in engines:
                self.engine_rows[engine["engine_id"]].update(engine)
            actors = state.get("actors") or []
            self.actors.value = _actors_html(actors) if actors else ""

    def close(self) -> None:
        """Stop following the cluster and close the widgets."""
        self._stop.set()
        self._wake.set()
        if self._cluster is not None:
            with contextlib.suppress(ValueError):
                self._cluster.connection.state_listeners.remove(self._on_state)
        super().close()
