"""A torch.distributed process group over engines, formed from the notebook.

``c.torch()`` runs the functions here on the engines (they travel by
reference: every engine imports this module, which imports torch only when
a group is formed). One engine picks a free port, then every engine sets
the variables torchrun would set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and calls
``init_process_group``. The group lives in the engine process, so it lasts
across cells until it is destroyed or the engine ends.

A group is known by its key: the backend, the timeout and the (engine id,
pid) of each rank in order. Asking again for the group the engines already
have does nothing; a new engine (a restart) makes a new key and so a new
group. Each engine keeps the group it joined, so a notebook that connects
later learns it from them.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import psutil

from jupyter_dist.context import engine_context, update_engine_context

DEFAULT_TIMEOUT_S = 60.0
_ENV_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

GroupKey = tuple[str, float, tuple[tuple[int, int], ...]]


@dataclass(frozen=True)
class TorchGroup:
    """A formed group, as the notebook sees it: what ``c.torch()`` returns."""

    backend: str
    world_size: int
    master_addr: str
    master_port: int
    ranks: dict[int, int]  # engine id -> rank
    timeout_s: float
    engine_pids: tuple[int, ...]  # in rank order: which processes form the group

    @property
    def engine_ids(self) -> list[int]:
        """The engines in rank order."""
        return sorted(self.ranks, key=self.ranks.__getitem__)

    @property
    def key(self) -> GroupKey:
        return (
            self.backend,
            self.timeout_s,
            tuple(zip(self.engine_ids, self.engine_pids, strict=True)),
        )


# ---- in the notebook -----------------------------------------------------


def plan(
    engines: dict[int, tuple[int, str, int]], backend: str, timeout_s: float, master_port: int
) -> tuple[TorchGroup, dict[int, tuple[int, int]]]:
    """The group over ``engines`` (id -> pid, host, GPUs), ranked in engine-id order.

    Returns the group and each engine's (local rank, local world size). Rank 0
    holds the rendezvous; on one host it listens on loopback.
    """
    ids = sorted(engines)
    if backend == "auto":
        backend = "nccl" if all(engines[i][2] > 0 for i in ids) else "gloo"
    hosts = [engines[i][1] for i in ids]
    by_host: dict[str, list[int]] = {}
    for engine_id, host in zip(ids, hosts, strict=True):
        by_host.setdefault(host, []).append(engine_id)
    local_ranks = {
        engine_id: (same_host.index(engine_id), len(same_host))
        for same_host in by_host.values()
        for engine_id in same_host
    }
    group = TorchGroup(
        backend=backend,
        world_size=len(ids),
        master_addr="127.0.0.1" if len(by_host) == 1 else hosts[0],
        master_port=master_port,
        ranks={engine_id: rank for rank, engine_id in enumerate(ids)},
        timeout_s=float(timeout_s),
        engine_pids=tuple(engines[i][0] for i in ids),
    )
    return group, local_ranks


# ---- on the engines ------------------------------------------------------

_group: TorchGroup | None = None
_is_cut = False  # its connections were cut to end a collective: it must be formed again


def current() -> TorchGroup | None:
    """This engine's usable group, or None without one (never imports torch)."""
    dist = sys.modules.get("torch.distributed")
    if _group is None or _is_cut or dist is None or not dist.is_initialized():
        return None
    return _group


def cut_connections() -> int:
    """End a collective blocked in this engine: shut down its connections to the other ranks.

    gloo waits for a peer until the group's timeout and cannot be woken
    earlier (neither a signal nor ``abort()`` reaches its wait); a closed
    connection fails the collective at once, here and in the ranks waiting
    for this one. Ranks on this host are found by their pids' sockets;
    collectives with ranks on other hosts still end at the timeout. The
    group is unusable afterwards: the next ``c.torch()`` forms it again.
    Called from the engine's I/O thread while user code holds the main
    thread; returns the number of connections shut.
    """
    global _is_cut
    if current() is None or _group is None:
        return 0
    peers: set[tuple[str, int]] = set()
    for pid in _group.engine_pids:
        if pid == os.getpid():
            continue
        try:
            peers.update(c.laddr for c in psutil.Process(pid).net_connections("tcp"))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # on another host, or gone
    shut = 0
    for connection in psutil.Process().net_connections("tcp"):
        if connection.raddr and connection.raddr in peers and connection.fd >= 0:
            with socket.socket(fileno=os.dup(connection.fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
            shut += 1
    _is_cut = shut > 0
    return shut


def describe() -> tuple[TorchGroup | None, int, str, int]:
    """This engine as a group needs it: its group, pid, host and number of GPUs."""
    context = engine_context()
    return current(), context.pid, context.host, len(context.gpus)


def free_port() -> int:
    """A TCP port free on this host now, for the group's rendezvous (rank 0 asks)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def form(group: TorchGroup, local_ranks: dict[int, tuple[int, int]]) -> None:
    """Join ``group`` as this engine's rank; leave any group this engine had first.

    ``local_ranks`` gives each engine its rank and the number of ranks on its host.
    """
    global _group, _is_cut
    import torch
    import torch.distributed as dist

    engine_id = engine_context().engine_id
    rank = group.ranks[engine_id]
    local_rank, local_world_size = local_ranks[engine_id]
    destroy()
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(group.world_size),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(local_world_size),
        MASTER_ADDR=group.master_addr,
        MASTER_PORT=str(group.master_port),
    )
    if group.backend == "nccl":
        torch.cuda.set_device(0)  # the engine's own GPU: CUDA_VISIBLE_DEVICES pinned it
    dist.init_process_group(
        group.backend,
        init_method="env://",
        rank=rank,
        world_size=group.world_size,
        timeout=datetime.timedelta(seconds=group.timeout_s),
    )
    _group, _is_cut = group, False
    update_engine_context(
        rank=rank,
        world_size=group.world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
    )


def destroy() -> None:
    """Leave this engine's group, if it has one, and forget its ranks."""
    global _group
    dist: Any = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()
    _group = None
    for name in _ENV_NAMES:
        os.environ.pop(name, None)
    update_engine_context(rank=None, world_size=None, local_rank=None, local_world_size=None)
