"""Follow the running clusters from inside the Jupyter server, on its asyncio loop.

``ClusterWatcher`` finds clusters from their connection files (every
``DISCOVERY_INTERVAL_S``), keeps one ``ClusterLink`` per cluster and tells
its listeners (the websockets) each change as an event dict:

- ``{"type": "clusters", "clusters": [...]}``: everything, sent on connect;
- ``{"type": "cluster", "cluster": {...}}``: one cluster appeared or changed;
- ``{"type": "cluster_removed", "cluster_id": ...}``: one is gone.

A link subscribes to its controller's state stream and holds a DEALER for
requests (status, stop, restart) with ``zmq.asyncio``: the server's loop
owns every socket here, and nothing blocks it. The signing key stays in the
link; ``describe()`` (all that leaves this module) never carries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from jupyter_dist import connection_file
from jupyter_dist.connection_file import ClusterInfo
from jupyter_dist.errors import ClusterError, DistTimeoutError, LauncherError
from jupyter_dist.launchers import local
from jupyter_dist.protocol import Message, MsgType, Session, new_id, unpack_or_drop
from jupyter_dist.security import secure_client

logger = logging.getLogger(__name__)

DISCOVERY_INTERVAL_S = 0.5
REQUEST_TIMEOUT_S = 10.0
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

Event = dict[str, Any]
Listener = Callable[[Event], None]


class ClusterLink:
    """One running cluster: its latest state and a way to send it requests."""

    def __init__(
        self,
        path: Path,
        info: ClusterInfo,
        ctx: zmq.asyncio.Context,
        on_change: Callable[[ClusterLink], None],
    ) -> None:
        self.path = path
        self.info = info
        self.state: dict[str, Any] = {}
        self._session = Session(bytes.fromhex(info.key))
        self._on_change = on_change
        self._requests: dict[str, asyncio.Future[Message]] = {}
        self._sub = ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        secure_client(self._sub, info)
        self._sub.connect(info.url(info.pub_port))
        self._dealer = ctx.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.LINGER, 0)
        secure_client(self._dealer, info)
        self._dealer.connect(info.url(info.client_port))
        self._tasks = [
            asyncio.ensure_future(self._receive(self._sub)),
            asyncio.ensure_future(self._receive(self._dealer)),
            asyncio.ensure_future(self._ask_state()),
        ]

    @property
    def cluster_id(self) -> str:
        return self.info.cluster_id

    def describe(self) -> dict[str, Any]:
        """What monitors may see of the cluster: never its key."""
        return {
            "cluster_id": self.info.cluster_id,
            "host": self.info.host,
            "ip": self.info.ip,
            "controller_pid": self.info.controller_pid,
            "created": self.info.created,
            "state": self.state,
        }

    async def request(
        self, msg_type: MsgType, content: dict[str, Any], timeout_s: float = REQUEST_TIMEOUT_S
    ) -> Message:
        """Send a request to the controller and wait for its reply; DistTimeoutError if none."""
        msg_id = new_id()
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._requests[msg_id] = future
        try:
            await self._dealer.send_multipart(
                self._session.pack(msg_type, content, msg_id=msg_id), copy=False
            )
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise DistTimeoutError(
                f"The controller of cluster {self.cluster_id!r} did not answer a {msg_type} "
                f"within {timeout_s} s."
            ) from None
        finally:
            self._requests.pop(msg_id, None)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for future in self._requests.values():
            if not future.done():
                future.set_exception(ClusterError(f"Cluster {self.cluster_id!r} is gone."))
        self._sub.close(linger=0)
        self._dealer.close(linger=0)

    async def _ask_state(self) -> None:
        """Publications only come on change: ask for the state once, so an idle cluster shows."""
        try:
            reply = await self.request(MsgType.STATUS_REQUEST, {})
        except (DistTimeoutError, ClusterError) as e:
            logger.warning("no state from cluster %s: %s", self.cluster_id, e)
            return
        self._take_state(reply.content)

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            unpacked = unpack_or_drop(self._session, frames, f"cluster {self.cluster_id}")
            if unpacked is None:
                continue
            for msg in unpacked[1]:
                if msg.msg_type == MsgType.STATE:
                    self._take_state(msg.content)
                    continue
                future = self._requests.get(msg.parent.get("msg_id", ""))
                if future is not None and not future.done():
                    future.set_result(msg)

    def _take_state(self, state: dict[str, Any]) -> None:
        if state.get("seq", 0) < self.state.get("seq", 0):
            return  # a status reply that crossed a newer publication
        self.state = state
        self._on_change(self)


class ClusterWatcher:
    """Every running cluster in the runtime directory, followed live; owned by the server's loop."""

    def __init__(self, discovery_interval_s: float = DISCOVERY_INTERVAL_S) -> None:
        self.discovery_interval_s = discovery_interval_s
        self.links: dict[str, ClusterLink] = {}
        self.listeners: set[Listener] = set()
        self._ctx: zmq.asyncio.Context | None = None
        self._discovery: asyncio.Task[None] | None = None
        self._started: list[subprocess.Popen[bytes]] = []  # controllers this server started

    def start(self) -> None:
        """Begin discovery on the running loop (idempotent)."""
        if self._discovery is None:
            self._ctx = zmq.asyncio.Context()
            self.refresh()
            self._discovery = asyncio.ensure_future(self._discover())

    async def stop(self) -> None:
        if self._discovery is not None:
            self._discovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._discovery
        for link in self.links.values():
            link.close()
        self.links.clear()
        if self._ctx is not None:
            self._ctx.term()
        self._discovery = None

    def snapshot(self) -> Event:
        return {"type": "clusters", "clusters": [link.describe() for link in self.links.values()]}

    def link(self, cluster_id: str) -> ClusterLink | None:
        return self.links.get(cluster_id)

    async def _discover(self) -> None:
        while True:
            await asyncio.sleep(self.discovery_interval_s)
            try:
                self.refresh()
            except Exception:  # the discovery loop must outlive one bad round
                logger.exception("finding running clusters failed")

    def refresh(self) -> None:
        """Link new clusters, drop those whose controller is gone."""
        # Reap controllers this server started, or a dead one would look alive (a zombie).
        self._started = [p for p in self._started if p.poll() is None]
        running = {info.cluster_id: (path, info) for path, info in connection_file.list_running()}
        for cluster_id in list(self.links):
            if cluster_id not in running:
                self.links.pop(cluster_id).close()
                logger.info("cluster %s is gone", cluster_id)
                self._emit({"type": "cluster_removed", "cluster_id": cluster_id})
        assert self._ctx is not None  # started
        for cluster_id, (path, info) in running.items():
            if cluster_id not in self.links:
                logger.info("following cluster %s (%s)", cluster_id, path)
                self.links[cluster_id] = ClusterLink(path, info, self._ctx, self._on_link_change)
                self._on_link_change(self.links[cluster_id])

    def _on_link_change(self, link: ClusterLink) -> None:
        self._emit({"type": "cluster", "cluster": link.describe()})

    def _emit(self, event: Event) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # one broken listener must not starve the others
                logger.exception("a cluster event listener failed")

    # ---- actions --------------------------------------------------------

    async def start_cluster(
        self, n: int, launcher: str = "local", engine_gpus: list[str] | None = None
    ) -> str:
        """Start a local cluster of ``n`` engines; return its id once its controller is up.

        ``engine_gpus`` is the plan from ``plan_engine_gpus`` (one entry per engine), if any.
        """
        if launcher != "local":
            raise LauncherError(
                f"The server can start only local clusters, not {launcher!r}; "
                f"start others from a notebook with `%dist start --launcher {launcher}`."
            )
        cluster_id = secrets.token_hex(4)
        process = local.start_controller(
            cluster_id, n, "127.0.0.1", connection_file.runtime_dir(), engine_gpus=engine_gpus
        )
        self._started.append(process)
        path = connection_file.path_for(cluster_id)
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while cluster_id not in self.links:
            if process.poll() is not None:
                raise LauncherError(
                    f"The controller of cluster {cluster_id!r} exited with code "
                    f"{process.returncode}; its log is {process.log_path}."
                )
            if asyncio.get_running_loop().time() > deadline:
                process.kill()
                raise LauncherError(
                    f"The controller of cluster {cluster_id!r} did not start within {START_TIMEOUT_S} s; "
                    f"its log is {process.log_path}."
                )
            if path.exists():
                self.refresh()
            await asyncio.sleep(0.05)
        return cluster_id

    async def stop_cluster(self, cluster_id: str) -> None:
        """Stop the controller and its engines; return once the controller has exited."""
        link = self._require(cluster_id)
        await link.request(MsgType.SHUTDOWN_REQUEST, {})
        deadline = asyncio.get_running_loop().time() + STOP_TIMEOUT_S
        while self._is_running(link.info) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        self.refresh()

    def _is_running(self, info: ClusterInfo) -> bool:
        for process in self._started:
            if process.pid == info.controller_pid:
                return process.poll() is None  # our child: reap it, or it lingers as a zombie
        return connection_file.is_alive(info)

    async def restart_engine(self, cluster_id: str, engine_id: int) -> dict[str, Any]:
        """Replace one engine in place; the reply says which engines restart and which were refused."""
        link = self._require(cluster_id)
        reply = await link.request(MsgType.RESTART_REQUEST, {"engine_ids": [engine_id]})
        return reply.content

    def _require(self, cluster_id: str) -> ClusterLink:
        link = self.links.get(cluster_id)
        if link is None:
            raise ClusterError(f"No cluster with id {cluster_id!r} is running.")
        return link
