"""The server extension against a real Jupyter server: discovery, relay, actions, auth.

The server runs in this process (pytest_jupyter's ``jp_serverapp``) with its
own runtime directory; clusters are started through its REST API, so the
controllers are children of this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import tornado.httpclient
import tornado.websocket

import jupyter_dist as jd
from jupyter_dist import connection_file
from jupyter_dist.gpus import list_gpus
from tests.nvidia import has_nvidia_driver

Fetch = Callable[..., Any]
Event = dict[str, Any]


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"jupyter_dist.server": True}}}


@pytest.fixture
def cleanup_clusters(jp_runtime_dir: Path) -> Iterator[None]:
    """Stop whatever a test left running in the server's runtime dir; kill what does not stop.

    Stopped, a controller removes its shared memory too; killed, it could not.
    """
    yield
    for path, info in connection_file.list_running():
        with contextlib.suppress(jd.JupyterDistError):
            jd.Cluster.connect(str(path)).stop()
        try:
            proc = psutil.Process(info.controller_pid)
            for p in [*proc.children(recursive=True), proc]:
                p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


class Events:
    """The events websocket, read with deadlines."""

    def __init__(self, ws: tornado.websocket.WebSocketClientConnection) -> None:
        self.ws = ws
        self.received: list[str] = []
        self.clusters: dict[str, Event] = {}

    async def next(self, timeout_s: float) -> Event:
        text = await asyncio.wait_for(self.ws.read_message(), timeout_s)
        assert text is not None, "the server closed the events websocket"
        self.received.append(str(text))
        event: Event = json.loads(text)
        if event["type"] == "clusters":
            self.clusters = {c["cluster_id"]: c for c in event["clusters"]}
        elif event["type"] == "cluster":
            self.clusters[event["cluster"]["cluster_id"]] = event["cluster"]
        elif event["type"] == "cluster_removed":
            self.clusters.pop(event["cluster_id"], None)
        return event

    async def until(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Read events until ``predicate()``; return the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout_s
        while not predicate():
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                await self.next(left)
            except TimeoutError:
                pytest.fail(f"{what} not reached after {timeout_s} s; clusters: {self.clusters}")
        return time.monotonic() - started

    def engines(self, cluster_id: str) -> list[Event]:
        cluster = self.clusters.get(cluster_id)
        return cluster["state"].get("engines", []) if cluster else []


async def _events(jp_ws_fetch: Fetch) -> Events:
    return Events(await jp_ws_fetch("jupyter-dist", "events"))


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


async def _start(jp_fetch: Fetch, n: int) -> str:
    reply = await jp_fetch("jupyter-dist", "clusters", method="POST", body=json.dumps({"n": n}))
    assert reply.code == 201
    cluster_id: str = json.loads(reply.body)["cluster_id"]
    return cluster_id


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", ("jupyter-dist", "clusters"), None),
        ("POST", ("jupyter-dist", "clusters"), '{"n": 1}'),
        ("GET", ("jupyter-dist", "clusters", "c0ffee"), None),
        ("DELETE", ("jupyter-dist", "clusters", "c0ffee"), None),
        ("POST", ("jupyter-dist", "clusters", "c0ffee", "engines", "0", "restart"), "{}"),
    ],
)
async def test_every_endpoint_refuses_a_request_without_the_token(
    jp_fetch: Fetch, method: str, path: tuple[str, ...], body: str | None
) -> None:
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await jp_fetch(*path, method=method, body=body, headers={"Authorization": ""})

    assert refused.value.code == 403
    assert connection_file.list_running() == []  # nothing was started


async def test_the_events_websocket_refuses_a_connection_without_the_token(
    jp_ws_fetch: Fetch,
) -> None:
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await jp_ws_fetch("jupyter-dist", "events", headers={"Authorization": "token wrong"})

    assert refused.value.code == 403


async def test_the_websocket_shows_a_started_cluster_and_an_engine_death_within_a_second(
    jp_fetch: Fetch, jp_ws_fetch: Fetch, cleanup_clusters: None
) -> None:
    events = await _events(jp_ws_fetch)
    assert (await events.next(5))["type"] == "clusters"

    cluster_id = await _start(jp_fetch, 2)
    await events.until(
        lambda: (
            [(e["state"], "rss_bytes" in e) for e in events.engines(cluster_id)]
            == [("idle", True), ("idle", True)]
        ),
        30,
        "two idle engines with their metrics on the websocket",
    )
    victim = events.engines(cluster_id)[1]
    os.kill(victim["pid"], signal.SIGKILL)
    took_s = await events.until(
        lambda: events.engines(cluster_id)[1]["state"] == "dead", 5, "engine 1 dead"
    )

    assert took_s < 1.0
    listed = json.loads((await jp_fetch("jupyter-dist", "clusters")).body)
    (cluster,) = listed["clusters"]
    assert cluster["cluster_id"] == cluster_id
    assert [e["state"] for e in cluster["state"]["engines"]] == ["idle", "dead"]
    assert "cpu_percent" in cluster["state"]["engines"][0]
    key = connection_file.read(connection_file.path_for(cluster_id)).key
    assert all(key not in text for text in [*events.received, listed and json.dumps(listed)])


async def test_restart_replaces_an_engine_and_stop_ends_every_process(
    jp_fetch: Fetch, jp_ws_fetch: Fetch, cleanup_clusters: None
) -> None:
    events = await _events(jp_ws_fetch)
    cluster_id = await _start(jp_fetch, 2)
    await events.until(lambda: len(events.engines(cluster_id)) == 2, 30, "two engines")
    old_pid = events.engines(cluster_id)[0]["pid"]
    controller_pid = events.clusters[cluster_id]["controller_pid"]

    reply = await jp_fetch(
        "jupyter-dist", "clusters", cluster_id, "engines", "0", "restart", method="POST", body="{}"
    )
    assert json.loads(reply.body)["restarting"] == [0]
    await events.until(
        lambda: (e := events.engines(cluster_id)[0])["pid"] != old_pid and e["state"] == "idle",
        30,
        "engine 0 back with a new process",
    )
    pids = [controller_pid, *(e["pid"] for e in events.engines(cluster_id))]

    reply = await jp_fetch("jupyter-dist", "clusters", cluster_id, method="DELETE")

    assert json.loads(reply.body) == {"stopped": cluster_id}
    await events.until(lambda: cluster_id not in events.clusters, 5, "the cluster removed")
    assert not psutil.pid_exists(controller_pid)  # the server reaped its child before replying
    _, alive = psutil.wait_procs(
        [p for p in map(_process, [old_pid, *pids]) if p is not None], timeout=5
    )
    assert alive == []


async def test_unknown_clusters_and_bad_requests_get_4xx(
    jp_fetch: Fetch, cleanup_clusters: None
) -> None:
    for args, kwargs, code in [
        (("jupyter-dist", "clusters", "nope"), {"method": "DELETE"}, 404),
        (("jupyter-dist", "clusters", "nope"), {}, 404),
        (("jupyter-dist", "clusters"), {"method": "POST", "body": '{"n": -1}'}, 400),
        (("jupyter-dist", "clusters"), {"method": "POST", "body": '{"launcher": "slurm"}'}, 400),
    ]:
        with pytest.raises(tornado.httpclient.HTTPClientError) as failed:
            await jp_fetch(*args, **kwargs)
        assert failed.value.code == code


async def _refused(jp_fetch: Fetch, body: dict[str, Any]) -> tuple[int, str]:
    """POST ``body`` to start a cluster, expecting a refusal: its status and message."""
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await jp_fetch("jupyter-dist", "clusters", method="POST", body=json.dumps(body))
    assert refused.value.response is not None
    message: str = json.loads(refused.value.response.body)["message"]
    return refused.value.code, message


@pytest.mark.skipif(has_nvidia_driver(), reason="checks a machine without an NVIDIA driver")
async def test_gpus_without_a_driver_are_refused_before_anything_starts(
    jp_fetch: Fetch, cleanup_clusters: None
) -> None:
    before = sorted(connection_file.runtime_dir().iterdir())

    for body in [{"gpus": "all"}, {"gpus": "0,3", "n": 2}, {"gpus_per_engine": 2}]:
        code, message = await _refused(jp_fetch, body)
        assert code == 400, body
        assert "NVIDIA" in message, message
        assert "driver" in message, message

    assert sorted(connection_file.runtime_dir().iterdir()) == before  # no connection file, no log
    assert connection_file.list_running() == []


async def test_gpu_fields_of_the_wrong_kind_are_refused_by_name(
    jp_fetch: Fetch, cleanup_clusters: None
) -> None:
    for body, named in [
        ({"gpus": "all", "gpus_per_engine": 0}, "gpus_per_engine"),
        ({"gpus": "all", "gpus_per_engine": "2"}, "gpus_per_engine"),
        ({"gpus": "all", "gpus_per_engine": True}, "gpus_per_engine"),
        ({"gpus": 2}, "gpus must be text"),
        ({"gpus": ["0", "3"]}, "gpus must be text"),
        ({"gpus": "all", "n": "4"}, "n must be"),
        ({"n": None}, "n must be"),  # without GPUs, nothing says how many engines
    ]:
        code, message = await _refused(jp_fetch, body)
        assert (code, named in message) == (400, True), (body, message)

    assert connection_file.list_running() == []


async def test_blank_gpus_start_cpu_engines(jp_fetch: Fetch, cleanup_clusters: None) -> None:
    reply = await jp_fetch(
        "jupyter-dist", "clusters", method="POST", body=json.dumps({"n": 1, "gpus": " "})
    )

    assert reply.code == 201
    cluster_id = json.loads(reply.body)["cluster_id"]
    assert [info.cluster_id for _, info in connection_file.list_running()] == [cluster_id]


@pytest.mark.gpu
@pytest.mark.skipif(not has_nvidia_driver(), reason="needs an NVIDIA driver (NVML)")
async def test_gpus_all_starts_one_engine_per_gpu_each_showing_its_own(
    jp_fetch: Fetch, jp_ws_fetch: Fetch, cleanup_clusters: None
) -> None:
    uuids = [g.uuid for g in list_gpus()]
    events = await _events(jp_ws_fetch)

    reply = await jp_fetch(
        "jupyter-dist", "clusters", method="POST", body=json.dumps({"gpus": "all"})
    )

    cluster_id = json.loads(reply.body)["cluster_id"]
    await events.until(
        lambda: (
            len(events.engines(cluster_id)) == len(uuids)
            and all(e["state"] == "idle" and e["gpus"] for e in events.engines(cluster_id))
        ),
        60,
        "one idle engine per GPU, each with its GPU sampled",
    )
    shown = [[g["uuid"] for g in e["gpus"]] for e in events.engines(cluster_id)]
    assert sorted(shown) == sorted([u] for u in uuids)
    assert all(e["gpus"][0]["index"] == 0 for e in events.engines(cluster_id))
