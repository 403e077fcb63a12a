"""The HTTP face of the server extension: REST verbs and the one events websocket.

Every REST verb is ``@tornado.web.authenticated`` (an ``APIHandler``
answers 403 to a request without the token); the websocket refuses in
``pre_get`` without a user or without the right to read ``jupyter_dist``.
Routes live under ``<base_url>/jupyter-dist/``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import tornado.web
from jupyter_core.utils import ensure_async
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from jupyter_dist.errors import ClusterError, DistTimeoutError, LauncherError
from jupyter_dist.launchers.gpus import plan_engine_gpus
from jupyter_dist.server.clusters import ClusterWatcher, Event

AUTH_RESOURCE = "jupyter_dist"
MAX_ENGINES = 256


class _WatcherHandler(APIHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def watcher(self) -> ClusterWatcher:
        watcher: ClusterWatcher = self.settings["jupyter_dist_watcher"]
        watcher.start()
        return watcher

    def _fail(self, status: int, error: Exception) -> None:
        self.set_status(status)
        self.finish(json.dumps({"message": str(error)}))


class ClustersHandler(_WatcherHandler):
    """``GET``: the running clusters and their states; ``POST {"n": 4}``: start one.

    The body may also carry ``gpus`` ("all", a count "2" or indices "0,3") and
    ``gpus_per_engine``; with GPUs, ``n`` may be left out for one engine per
    GPU share. GPUs are planned before anything starts, so a request for GPUs
    this machine lacks is a 400 saying what it has.
    """

    @tornado.web.authenticated
    async def get(self) -> None:
        self.finish(json.dumps(self.watcher.snapshot()))

    @tornado.web.authenticated
    async def post(self) -> None:
        body = self.get_json_body() or {}
        gpus, gpus_per_engine = _gpu_request(body)
        is_gpu_request = gpus is not None or gpus_per_engine is not None
        n = body.get("n", None if is_gpu_request else 2)
        launcher = body.get("launcher", "local")
        bad_n = tornado.web.HTTPError(400, f"n must be a number of engines from 0 to {MAX_ENGINES}")
        if n is not None and (
            not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_ENGINES
        ):
            raise bad_n
        try:
            # NVML can take a while to start: keep it off the server's loop.
            plan = await asyncio.to_thread(plan_engine_gpus, gpus, gpus_per_engine, n)
        except LauncherError as e:
            self._fail(400, e)
            return
        n_engines = len(plan) if plan is not None else n
        if n_engines is None:  # {"n": null} without GPUs to count engines by
            raise bad_n
        try:
            cluster_id = await self.watcher.start_cluster(
                n_engines, str(launcher), engine_gpus=plan
            )
        except LauncherError as e:
            self._fail(500 if launcher == "local" else 400, e)
            return
        self.set_status(201)
        self.finish(json.dumps({"cluster_id": cluster_id}))


def _gpu_request(body: dict[str, Any]) -> tuple[str | None, int | None]:
    """The body's ``gpus`` (None when absent or blank) and ``gpus_per_engine``, type-checked."""
    gpus = body.get("gpus")
    if gpus is not None and not isinstance(gpus, str):
        raise tornado.web.HTTPError(
            400,
            f"gpus must be text: 'all', a count such as '2' or indices such as '0,3'; not {gpus!r}",
        )
    per_engine = body.get("gpus_per_engine")
    if per_engine is not None and (
        not isinstance(per_engine, int) or isinstance(per_engine, bool) or per_engine < 1
    ):
        raise tornado.web.HTTPError(
            400, f"gpus_per_engine must be a whole number of 1 or more, not {per_engine!r}"
        )
    return (gpus.strip() or None) if gpus is not None else None, per_engine


class ClusterHandler(_WatcherHandler):
    """``GET``: one cluster; ``DELETE``: stop it and all its engines."""

    def _link_or_404(self, cluster_id: str) -> Any:
        link = self.watcher.link(cluster_id)
        if link is None:
            raise tornado.web.HTTPError(404, f"no running cluster {cluster_id}")
        return link

    @tornado.web.authenticated
    async def get(self, cluster_id: str) -> None:
        self.finish(json.dumps(self._link_or_404(cluster_id).describe()))

    @tornado.web.authenticated
    async def delete(self, cluster_id: str) -> None:
        self._link_or_404(cluster_id)
        try:
            await self.watcher.stop_cluster(cluster_id)
        except (DistTimeoutError, ClusterError) as e:
            self._fail(504, e)
            return
        self.finish(json.dumps({"stopped": cluster_id}))


class EngineRestartHandler(_WatcherHandler):
    """``POST``: replace one engine in place (its work fails; a fresh engine takes its id)."""

    @tornado.web.authenticated
    async def post(self, cluster_id: str, engine_id: str) -> None:
        if self.watcher.link(cluster_id) is None:
            raise tornado.web.HTTPError(404, f"no running cluster {cluster_id}")
        try:
            reply = await self.watcher.restart_engine(cluster_id, int(engine_id))
        except (DistTimeoutError, ClusterError) as e:
            self._fail(504, e)
            return
        refused = reply.get("refused") or {}
        if refused:
            self._fail(409, ClusterError("; ".join(refused.values())))
            return
        self.finish(json.dumps(reply))


class EventsHandler(WebSocketMixin, WebSocketHandler, JupyterHandler):
    """One websocket that carries every cluster's state as JSON events (see ``clusters.py``)."""

    auth_resource = AUTH_RESOURCE

    async def pre_get(self) -> None:
        user = self.current_user
        if user is None:
            self.log.warning("refused a jupyter-dist events websocket without a user")
            raise tornado.web.HTTPError(403)
        if not await ensure_async(self.authorizer.is_authorized(self, user, "read", AUTH_RESOURCE)):
            raise tornado.web.HTTPError(403)

    async def get(self, *args: Any, **kwargs: Any) -> None:
        await self.pre_get()
        result = super().get(*args, **kwargs)
        if result is not None:
            await result

    def open(self, *args: Any, **kwargs: Any) -> None:
        super().open(*args, **kwargs)
        watcher: ClusterWatcher = self.settings["jupyter_dist_watcher"]
        watcher.start()
        watcher.listeners.add(self._send_event)
        self._send_event(watcher.snapshot())

    def on_message(self, message: str | bytes) -> None:
        """The panel sends nothing; actions go through the REST verbs."""

    def on_close(self) -> None:
        self.settings["jupyter_dist_watcher"].listeners.discard(self._send_event)

    def _send_event(self, event: Event) -> None:
        try:
            self.write_message(json.dumps(event))
        except WebSocketClosedError:
            self.settings["jupyter_dist_watcher"].listeners.discard(self._send_event)


def route_table() -> list[tuple[str, type]]:
    """URL patterns relative to the base URL (the extension app joins them to it)."""
    cluster = r"jupyter-dist/clusters/(?P<cluster_id>[0-9A-Za-z_-]+)"
    return [
        (r"jupyter-dist/clusters/?", ClustersHandler),
        (cluster + r"/?", ClusterHandler),
        (cluster + r"/engines/(?P<engine_id>\d+)/restart/?", EngineRestartHandler),
        (r"jupyter-dist/events", EventsHandler),
    ]
