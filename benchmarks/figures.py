"""The figures every peer reports, the sizes of the work, and the tables that compare them.

A figure is a key, a label, a unit and a direction (lower or higher is
better). Each peer returns ``{key: [sample, ...]}``; a key a peer has no
equivalent for is left out and shows as n/a. Ratios are always "how many
times better jupyter-dist is": above 1 it wins, below 1 it loses.

Figures come in groups, each printed as a table of its own beside its own
peers: ``core`` (issue 5: messages, transfers, start and stop, memory)
against ipyparallel, Dask and Ray, and ``torch`` (issue 13: start-up to the
first torch.distributed collective) against torchrun and accelerate.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

MB = 1e6


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each figure does; ``quick()`` is the smoke test's tiny version."""

    roundtrip_reps: int = 300
    tasks: int = 10_000
    task_reps: int = 3
    broadcast_reps: int = 100
    nbytes: int = 100_000_000
    transfer_reps: int = 7
    startup_reps: int = 3
    engines_small: int = 2
    engines_large: int = 8
    idle_window_s: float = 5.0
    settle_s: float = 2.0
    pipelined_msgs: int = 50_000
    torch_start_reps: int = 5

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            roundtrip_reps=3,
            tasks=20,
            task_reps=1,
            broadcast_reps=3,
            nbytes=2_000_000,
            transfer_reps=1,
            startup_reps=1,
            engines_small=2,
            engines_large=2,
            idle_window_s=0.2,
            settle_s=0.0,
            pipelined_msgs=200,
            torch_start_reps=1,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Figure:
    key: str
    label: str
    unit: str
    is_lower_better: bool
    floor: str = ""  # the floors' figure shown (and compared) in this figure's row, if any


def catalog(sizes: Sizes) -> list[Figure]:
    """The figures of issue 5, in table order, labelled with the sizes actually run."""
    small, large = sizes.engines_small, sizes.engines_large
    mb = f"{sizes.nbytes / MB:g} MB"
    return [
        Figure("roundtrip_direct", "no-op round trip, one engine, direct", "ms", True),
        Figure("roundtrip_direct_cpu", "CPU of all processes per direct round trip", "ms", True),
        Figure("roundtrip_balanced", "no-op round trip, load-balanced", "ms", True),
        Figure("throughput", f"{sizes.tasks:,} no-op tasks on {small} engines", "tasks/s", False),
        Figure("broadcast_small", f"broadcast a tiny statement to {small} engines", "ms", True),
        Figure("broadcast_large", f"broadcast a tiny statement to {large} engines", "ms", True),
        Figure(
            "broadcast_large_cpu",
            f"CPU of all processes per broadcast to {large} engines",
            "ms",
            True,
        ),
        Figure("push", f"push {mb} numpy to one engine", "MB/s", False),
        Figure("pull", f"pull {mb} numpy from one engine", "MB/s", False),
        Figure("scatter", f"scatter {mb} over {small} engines", "MB/s", False),
        Figure("gather", f"gather {mb} from {small} engines", "MB/s", False),
        Figure("startup_small", f"start {small} engines (until ready)", "s", True),
        Figure("startup_large", f"start {large} engines (until ready)", "s", True),
        Figure("stop_small", f"stop a cluster of {small} engines", "s", True),
        Figure("stop_large", f"stop a cluster of {large} engines", "s", True),
        Figure("engine_rss", "idle engine RSS", "MB", True),
        Figure("engine_uss", "idle engine USS", "MB", True),
        Figure("controller_rss", "idle controller RSS", "MB", True),
        Figure("controller_uss", "idle controller USS", "MB", True),
        Figure("idle_cpu", f"idle CPU of a {large}-engine cluster", "% core", True),
        Figure("floor_broker_roundtrip", "floor: pyzmq round trip via a Python broker", "ms", True),
        Figure("floor_broker_pipelined", "floor: the same, pipelined", "msgs/s", False),
        Figure(
            "floor_parts_roundtrip",
            "floor: round trip through jupyter-dist's client and engine parts, no controller",
            "ms",
            True,
        ),
        Figure("floor_zmq_send", f"floor: one {mb} pyzmq copy=False send, TCP", "MB/s", False),
        Figure("floor_tcp_send", f"floor: {mb} over a plain TCP socket", "MB/s", False),
        Figure("floor_memcpy", f"floor: memcpy of {mb}", "MB/s", False),
    ]


def torch_catalog(sizes: Sizes) -> list[Figure]:
    """The start-up figures of issue 13: from nothing to the first all_reduce of a gloo group.

    The first row is the whole start, the same for every peer; the
    ``torch_step_*`` rows take jupyter-dist's start apart on clusters of
    their own, and ``torch_import_launcher`` is what a fresh notebook pays
    to import the launcher before its first start.
    """
    n = sizes.engines_large
    return [
        Figure(
            "torch_start",
            f"start {n} processes with a gloo group, to the first all_reduce",
            "s",
            True,
            floor="floor_torch_import",
        ),
        Figure(
            "torch_start_failed",
            f"starts that failed or hung past 2 min (of {sizes.torch_start_reps})",
            "starts",
            True,
        ),
        Figure("torch_step_start", f"step: start {n} engines (until ready)", "s", True),
        Figure("torch_step_import", f"step: `import torch.distributed` on {n} engines", "s", True),
        Figure("torch_step_group", "step: form the group (`c.torch()`), torch imported", "s", True),
        Figure("torch_step_all_reduce", "step: the first all_reduce, group formed", "s", True),
        Figure(
            "torch_import_launcher", "import the launcher in a fresh notebook process", "s", True
        ),
    ]


@dataclass(frozen=True, slots=True)
class Group:
    """Figures printed as one table, and the peers measured beside jupyter-dist in it."""

    title: str
    figures: Callable[[Sizes], list[Figure]]
    compared: list[str]

    @property
    def peers(self) -> list[str]:
        return ["jupyter_dist", *self.compared, "floors"]


GROUPS = {
    "core": Group(
        "jupyter-dist beside ipyparallel, Dask and Ray", catalog, ["ipyparallel", "dask", "ray"]
    ),
    "torch": Group(
        "Start-up to the first torch.distributed collective",
        torch_catalog,
        ["torchrun", "accelerate"],
    ),
}
PEERS = list(dict.fromkeys(p for group in GROUPS.values() for p in group.peers))


def summary(samples: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of a figure's samples."""
    return statistics.median(samples), min(samples), max(samples)


def _fmt(value: float) -> str:
    if value == 0:
        return "0"  # a count of failures
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _cell(samples: list[float] | None) -> str:
    if not samples:
        return "n/a"
    med, lo, hi = summary(samples)
    if len(samples) == 1:
        return _fmt(med)
    return f"{_fmt(med)} ({_fmt(lo)}-{_fmt(hi)})"


def ratio(figure: Figure, ours: list[float] | None, theirs: list[float] | None) -> str:
    """How many times better jupyter-dist's median is than a peer's (n/a if either is missing)."""
    if not ours or not theirs:
        return "n/a"
    mine, other = summary(ours)[0], summary(theirs)[0]
    if mine <= 0 or other <= 0:
        return "n/a"
    times = other / mine if figure.is_lower_better else mine / other
    return f"{times:.2f}x"


def table(group: Group, sizes: Sizes, results: dict[str, dict[str, list[float]]]) -> str:
    """A Markdown table: each peer's median (min-max), then jupyter-dist's ratio to each peer.

    A ``floor_*`` figure fills only the floor column. A figure with a ``floor``
    shows that floor in its own row, with a "vs floor" ratio (below 1: slower
    than the floor, as jupyter-dist always is).
    """
    figures = group.figures(sizes)
    has_floor_ratio = any(f.floor for f in figures)
    head = [
        "figure",
        "unit",
        "jupyter-dist",
        *group.compared,
        "floor",
        *(f"vs {p}" for p in group.compared),
        *(["vs floor"] if has_floor_ratio else []),
    ]
    floors = results.get("floors", {})
    blank = [""] * len(group.compared)
    rows = [head, ["---"] * len(head)]
    for figure in figures:
        row = [figure.label, figure.unit]
        if figure.key.startswith("floor_"):
            row += ["", *blank, _cell(floors.get(figure.key)), *blank]
            row += [""] if has_floor_ratio else []
        else:
            ours = results.get("jupyter_dist", {}).get(figure.key)
            theirs = [results.get(p, {}).get(figure.key) for p in group.compared]
            floor = floors.get(figure.floor) if figure.floor else None
            row += [_cell(ours), *(_cell(t) for t in theirs)]
            row.append(_cell(floor) if figure.floor else "")
            row += [ratio(figure, ours, t) for t in theirs]
            if has_floor_ratio:
                row.append(ratio(figure, ours, floor) if figure.floor else "")
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)
