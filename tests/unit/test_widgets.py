"""The notebook monitor draws the published state: engines, GPUs, actors, tasks."""

from __future__ import annotations

from typing import Any

import pytest

from jupyter_dist.widgets import ClusterMonitor, format_bytes

GPU = {
    "index": 0,
    "name": "NVIDIA H100",
    "uuid": "GPU-1",
    "utilization_percent": 55,
    "memory_used_bytes": 40 * 10**9,
    "memory_total_bytes": 80 * 10**9,
    "temperature_c": 51,
    "power_w": 301.5,
    "process_memory_bytes": 10**9,
}


def _engine(engine_id: int, **fields: Any) -> dict[str, Any]:
    return {
        "engine_id": engine_id,
        "host": "gpu1",
        "pid": 4711 + engine_id,
        "state": "idle",
        "task_id": None,
        "queued": 0,
        "cpu_percent": 12,
        "rss_bytes": 150 * 10**6,
        "gpus": [],
        **fields,
    }


def _state(*engines: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "cluster_id": "c0ffee",
        "engines": list(engines),
        "tasks": {"pending": 3, "queued": 1, "done": 10, "failed": 2},
        "actors": [],
        **fields,
    }


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [(None, "-"), (512, "512 B"), (1536, "1.5 kB"), (150 * 10**6, "150.0 MB"), (8e13, "80.0 TB")],
)
def test_byte_counts_read_in_the_largest_fitting_unit(nbytes: float | None, text: str) -> None:
    assert format_bytes(nbytes) == text


def test_each_engine_gets_a_row_with_state_host_cpu_memory_and_task() -> None:
    monitor = ClusterMonitor()

    monitor.render(
        _state(
            _engine(0), _engine(1, state="busy", cpu_percent=250, task_id="7f3c9a01ff", queued=2)
        )
    )

    busy = monitor.engine_rows[1]
    assert sorted(monitor.engine_rows) == [0, 1]
    assert "busy" in busy.state.value
    assert busy.host.value == "gpu1:4712"
    assert busy.cpu_bar.value == 100  # several cores: the bar is full, the label says how full
    assert busy.cpu.children[1].value == "250%"
    assert busy.memory.value == "150.0 MB"
    assert busy.task.value == "7f3c9a01 (+2 queued)"
    assert "2 of 2 engines alive; tasks: 10 done, 3 pending (1 queued), 2 failed" in (
        monitor.header.value
    )


def test_each_gpu_gets_a_utilisation_bar_and_a_memory_bar() -> None:
    monitor = ClusterMonitor()

    monitor.render(_state(_engine(0, gpus=[GPU, {**GPU, "index": 1, "utilization_percent": 5}])))

    bars = monitor.engine_rows[0].gpus
    assert [(b.utilization.value, b.memory.value) for b in bars] == [(55, 50), (5, 50)]
    assert "GPU 0: 55%, 40.0 GB / 80.0 GB, this engine 1.0 GB, 51 °C, 302 W" in bars[0].label.value


def test_a_new_state_updates_the_same_rows_and_a_new_engine_adds_one() -> None:
    monitor = ClusterMonitor()
    monitor.render(_state(_engine(0)))
    row = monitor.engine_rows[0]

    monitor.render(_state(_engine(0, cpu_percent=80)))
    same_row = monitor.engine_rows[0]
    monitor.render(_state(_engine(0, state="dead"), _engine(1)))

    assert same_row is row
    assert row.cpu_bar.value == 80
    assert sorted(monitor.engine_rows) == [0, 1]
    assert "dead" in monitor.engine_rows[0].state.value
    assert "1 of 2 engines alive" in monitor.header.value


def test_actors_are_listed_with_their_engine_calls_and_state() -> None:
    monitor = ClusterMonitor()
    actor = {
        "actor_id": "a1b2c3d4e5",
        "class_name": "Counter",
        "engine_id": 1,
        "pending": 2,
        "calls_done": 5,
        "state": {"count": 15},
    }

    monitor.render(_state(_engine(0)))
    without = monitor.actors.value
    monitor.render(_state(_engine(0), actors=[actor]))

    assert without == ""
    assert "<td>a1b2c3d4</td><td>Counter</td><td>1</td><td>2</td><td>5</td>" in monitor.actors.value
    assert "{&#x27;count&#x27;: 15}" in monitor.actors.value


def test_engine_text_is_escaped() -> None:
    monitor = ClusterMonitor()

    monitor.render(_state(_engine(0, host="<script>")))

    assert monitor.engine_rows[0].host.value.startswith("&lt;script&gt;")
