"""Views: one interface to run work on a set of engines (the whole cluster is a view too)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import linecache
import os
import types
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from jupyter_dist import shm, torch_group
from jupyter_dist.actor_handle import ActorHandle
from jupyter_dist.client import sequences
from jupyter_dist.client.output import OutputGroup
from jupyter_dist.errors import JupyterDistError, NoEnginesError, SerializationError
from jupyter_dist.futures import Future, MultiFuture, then
from jupyter_dist.protocol import new_id
from jupyter_dist.serialize import serialize

if TYPE_CHECKING:
    from jupyter_dist.client.cluster import Cluster

MAX_SHIPPED_SOURCE_NBYTES = 256 * 1024


# Per code object: its file and a notebook cell's text do not change, and a stat() per
# submitted task was the largest item of the client's time per task in a profile.
_sources_cache: weakref.WeakKeyDictionary[types.CodeType, dict[str, str]] = (
    weakref.WeakKeyDictionary()
)


def _sources_of(fn: Any) -> dict[str, str]:
    """The source of a function defined where the engines cannot read it (a notebook cell)."""
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType):
        return {}
    cached = _sources_cache.get(code)
    if cached is not None:
        return cached
    sources: dict[str, str] = {}
    filename = code.co_filename
    if not os.path.exists(filename):
        text = "".join(linecache.getlines(filename))
        if text and len(text) <= MAX_SHIPPED_SOURCE_NBYTES:
            sources = {filename: text}
    _sources_cache[code] = sources
    return sources


class View:
    """A set of engines to run work on.

    ``c[0]`` is a single-engine view (results are bare values); ``c[0:2]``
    and ``c[[1, 3]]`` are views over several (results are lists, one per
    engine in id order). Blocking calls wait for their results; with
    ``block=False`` they return a ``Future`` at once.
    """

    def __init__(
        self, cluster: Cluster, targets: Sequence[int] | None, is_single: bool = False
    ) -> None:
        self._cluster = cluster
        self._targets = list(targets) if targets is not None else None
        self._is_single = is_single

    def __repr__(self) -> str:
        return f"<View of cluster {self._cluster.id!r} on engines {self._targets if self._targets is not None else 'all'}>"

    @property
    def engine_ids(self) -> list[int]:
        """The engines this view runs on (for the whole cluster: the live ones, now)."""
        if self._targets is not None:
            return list(self._targets)
        return self._cluster.live_engine_ids()

    def _require_engines(self) -> list[int]:
        ids = self.engine_ids
        if not ids:
            raise NoEnginesError(self._cluster.id)
        return ids

    # ---- sending ----------------------------------------------------

    def _send(
        self,
        engine_id: int | None,
        kind: str,
        payload: Any = None,
        what: str = "",
        output: OutputGroup | None = None,
        **fields: Any,
    ) -> Future:
        pickled, raw = serialize(payload, what) if payload is not None else (b"", [])
        targets = [engine_id] if engine_id is not None else fields.get("allowed")
        raw, descriptors = self._cluster.connection.export_buffers(raw, targets, shared=False)
        if descriptors:
            fields["shm"] = descriptors
        return self._send_serialized(engine_id, kind, pickled, raw, output, **fields)

    def _send_serialized(
        self,
        engine_id: int | None,
        kind: str,
        pickled: bytes,
        raw: list[memoryview],
        output: OutputGroup | None,
        **fields: Any,
    ) -> Future:
        content = {"task_id": new_id(), "kind": kind, "target": engine_id, **fields}
        return self._cluster.connection.submit(content, [pickled] if pickled else [], raw, output)

    def _broadcast(
        self, kind: str, payload: Any, what: str, combine: Callable[[list[Any]], Any], **fields: Any
    ) -> Future:
        ids = self._require_engines()
        pickled, raw = serialize(payload, what) if payload is not None else (b"", [])
        connection = self._cluster.connection
        # Several engines map one copy; it is removed once all of them have replied.
        is_shared = len(ids) > 1
        raw, descriptors = connection.export_buffers(raw, ids, shared=is_shared)
        if descriptors:
            fields["shm"] = descriptors
            fields["shm_receivers"] = len(ids)  # the controller removes it once all have it
        group = connection.output.new_group(ids)
        children = [self._send_serialized(i, kind, pickled, raw, group, **fields) for i in ids]
        future = MultiFuture(new_id(), children, combine)
        if descriptors and is_shared and connection.shm_pool is not None:
            pool, segments = connection.shm_pool, [d[1:] for d in descriptors]
            future.add_done_callback(lambda _: pool.unlink(segments))
        return future

    def _collapse(self, values: list[Any]) -> Any:
        return values[0] if self._is_single else values

    def _finish(self, future: Future, block: bool) -> Any:
        return self._cluster.wait(future) if block else future

    # ---- the API ----------------------------------------------------

    def run(self, code: str, block: bool = True, display: bool = False) -> Any:
        """Run ``code`` (a cell: magics and ``!cmd`` work) on every engine of the view.

        Returns the value of the cell's last expression on each engine; with
        ``display=True`` that value is shown instead (``Out[engine:n]``, as
        ``%%distributed`` does) and None is returned.

        Examples
        --------
        >>> c.run("import os; os.getpid()")
        [4711, 4712]
        """
        fields: dict[str, Any] = {
            "code": code,
            "display_result": display,
            "execution_count": self._cluster.connection.next_execution_count(),
        }
        return self._finish(self._broadcast("execute", None, "", self._collapse, **fields), block)

    def apply(self, fn: Callable[..., Any], *args: Any, block: bool = True, **kwargs: Any) -> Any:
        """Call ``fn(*args, **kwargs)`` on every engine of the view; return each result.

        ``block`` is taken by the view; pass a keyword of that name inside a ``functools.partial``.
        """
        name = getattr(fn, "__name__", repr(fn))
        payload = (fn, args, kwargs)
        future = self._broadcast(
            "apply", payload, f"{name} or its arguments", self._collapse, sources=_sources_of(fn)
        )
        return self._finish(future, block)

    def push(
        self, names: dict[str, Any] | None = None, *, block: bool = True, **kw_names: Any
    ) -> Any:
        """Set names in every engine's namespace: ``c.push(x=arr, y=3)``."""
        values = {**(names or {}), **kw_names}
        try:
            future = self._broadcast("push", values, "the pushed names", lambda _: None)
        except SerializationError:
            for name, value in values.items():
                serialize(value, repr(name))  # raises, naming the value that cannot be sent
            raise
        return self._finish(future, block)

    def pull(self, names: str | Sequence[str], block: bool = True) -> Any:
        """Get a name's value (or a list of names' values) from every engine."""
        if isinstance(names, str):
            future = self._broadcast(
                "pull", None, "", lambda vs: self._collapse([v[0] for v in vs]), names=[names]
            )
        else:
            future = self._broadcast("pull", None, "", self._collapse, names=list(names))
        return self._finish(future, block)

    def scatter(self, name: str, seq: Any, block: bool = True) -> Any:
        """Split ``seq`` (list, tuple, numpy array, torch tensor) along axis 0, chunk k to engine k.

        Chunk sizes differ by at most one.
        """
        ids = self._require_engines()
        chunks = sequences.split(seq, len(ids), name)
        children = [
            self._send(i, "push", {name: chunk}, repr(name))
            for i, chunk in zip(ids, chunks, strict=True)
        ]
        return self._finish(MultiFuture(new_id(), children, lambda _: None), block)

    def gather(self, name: str, block: bool = True) -> Any:
        """Join the engines' values of ``name`` (in engine order) into one sequence of the same type.

        Engines on this host write large numpy arrays straight into one
        shared-memory array here: each part is copied once, all in parallel.
        """
        ids = self._require_engines()
        in_place = self._cluster.connection.shares_memory_with(ids)
        parts = self._broadcast(
            "pull", None, "", lambda vs: [v[0] for v in vs], names=[name], in_place=in_place
        )
        return self._finish(then(parts, lambda values: self._join(ids, name, values)), block)

    def _join(self, ids: list[int], name: str, values: list[Any]) -> Any:
        """Join gathered values; arrays the engines kept (their layouts came instead) are fetched first."""
        pool = self._cluster.connection.shm_pool
        allocate = pool.allocate if pool is not None else None
        kept = [(i, v) for i, v in zip(ids, values, strict=True) if isinstance(v, shm.ArrayLayout)]
        if not kept:
            return sequences.join(values, name, allocate)
        layouts = [layout for _, layout in kept]
        shape = sequences.joined_shape(layouts)
        if pool is not None and shape is not None and len(kept) == len(values):
            try:
                segment, view = pool.allocate_shared(sum(layout.nbytes for layout in layouts))
            except OSError:  # shared memory full: fetch them the plain way below
                pass
            else:
                offsets = itertools.accumulate([0] + [layout.nbytes for layout in layouts[:-1]])
                writes = [
                    self._send(
                        engine_id,
                        "pull",
                        names=[name],
                        into=segment,
                        offset=offset,
                        layout=[layout.dtype, list(layout.shape), layout.nbytes],
                    )
                    for (engine_id, layout), offset in zip(kept, offsets, strict=True)
                ]
                dtype = layouts[0].dtype
                return MultiFuture(
                    new_id(), writes, lambda _: sequences.array_over(view, dtype, shape)
                )
        fetches = [self._send(i, "pull", names=[name]) for i, _ in kept]

        def join_fetched(fetched: list[Any]) -> Any:
            arrays = iter(v[0] for v in fetched)
            whole = [next(arrays) if isinstance(v, shm.ArrayLayout) else v for v in values]
            return sequences.join(whole, name, allocate)

        return MultiFuture(new_id(), fetches, join_fetched)

    def torch(
        self,
        backend: str = "auto",
        timeout: float = torch_group.DEFAULT_TIMEOUT_S,
        destroy: bool = False,
    ) -> torch_group.TorchGroup | None:
        """Form a torch.distributed group over the view's engines (rank k: the k-th engine id).

        Sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
        ``MASTER_ADDR`` and ``MASTER_PORT`` on every engine and calls
        ``init_process_group``: with ``backend="auto"``, NCCL when every engine
        has a GPU (each on its own, ``cuda:0``), else gloo. The group lasts
        across cells; asking again for the same group does nothing. A
        collective waiting for a rank that died or never comes fails after
        ``timeout`` seconds at most. ``destroy=True`` ends the group.

        Examples
        --------
        >>> c.torch()  # then, in a %%distributed cell: dist.all_reduce(t)
        """
        ids = self._require_engines()
        if destroy:
            self.apply(torch_group.destroy)
            self._cluster.connection.torch_group = None
            return None
        if backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', not {backend!r}")
        described = dict(zip(ids, self._all(self.apply(torch_group.describe)), strict=True))
        engines = {i: (pid, host, n_gpus) for i, (_, pid, host, n_gpus) in described.items()}
        if backend == "nccl" and any(n_gpus == 0 for _, _, n_gpus in engines.values()):
            without = [i for i, (_, _, n_gpus) in engines.items() if n_gpus == 0]
            raise JupyterDistError(
                f"The NCCL backend needs a GPU on every engine; engines {without} have none. "
                "Start GPU engines with `%dist start --gpus all`, or use backend='gloo'."
            )
        group, local_ranks = torch_group.plan(engines, backend, timeout, master_port=0)
        current: list[torch_group.TorchGroup | None] = [had for had, *_ in described.values()]
        kept = current[0]
        if kept is not None and all(had is not None and had.key == group.key for had in current):
            self._cluster.connection.torch_group = kept
            return kept
        port = self._cluster[ids[0]].apply(torch_group.free_port)
        group = dataclasses.replace(group, master_port=port)
        self.apply(torch_group.form, group, local_ranks)
        self._cluster.connection.torch_group = group
        return group

    def _all(self, values: Any) -> list[Any]:
        """A blocking call's result as a list, also on a single-engine view."""
        return [values] if self._is_single else list(values)

    def submit(self, fn: Callable[..., Any], *args: Any, retries: int = 0, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` once, on the least busy engine of the view.

        ``retries=2`` runs it again, up to twice, on another engine when the
        engine running it dies (never when ``fn`` raises); the last error
        then names every engine it died on. ``retries`` is taken by the view;
        pass a keyword of that name inside a ``functools.partial``.

        Examples
        --------
        >>> f = c.submit(pow, 2, 10, retries=2)
        >>> f.result()
        1024
        """
        fields = self._balanced_fields(fn, retries)
        name = getattr(fn, "__name__", repr(fn))
        return self._send(None, "apply", (fn, args, kwargs), f"{name} or its arguments", **fields)

    def _balanced_fields(self, fn: Callable[..., Any], retries: int) -> dict[str, Any]:
        """What a load-balanced task of ``fn`` carries besides its arguments."""
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a whole number of 0 or more, not {retries!r}")
        ids = self._require_engines()
        fields: dict[str, Any] = {"sources": _sources_of(fn)}
        if self._targets is not None:
            fields["allowed"] = ids
        if retries:
            fields["retries"] = retries
        return fields

    def actor(
        self,
        cls: type,
        *args: Any,
        name: str | None = None,
        max_concurrency: int = 1,
        max_restarts: int = 0,
        **kwargs: Any,
    ) -> ActorHandle:
        """Create ``cls(*args, **kwargs)`` on the least busy engine of the view; return its handle.

        Its method calls return futures and run one at a time, in each
        caller's order (``max_concurrency`` lets several run at once, on
        threads or, for ``async def`` methods, on the actor's event loop).
        ``name`` lets any client find it with ``c.get_actor(name)``;
        ``max_restarts`` lets it be made again on another engine when its
        engine dies (its state then starts afresh). Blocks until the
        constructor has run, and raises its error.

        Examples
        --------
        >>> A = c.actor(Counter, 10)
        >>> A.incr(5).result()
        15
        """
        self._require_engines()
        label = name or cls.__name__
        methods = sorted(
            m for m in dir(cls) if not m.startswith("_") and callable(getattr(cls, m, None))
        )
        fields: dict[str, Any] = {
            "actor_id": new_id(),
            "class_name": cls.__qualname__,
            "name": name,
            "methods": methods,
            "max_concurrency": max_concurrency,
            "max_restarts": max_restarts,
            "sources": _sources_of(getattr(cls, "__init__", None)),
        }
        target = self.engine_ids[0] if self._is_single else None
        if target is None and self._targets is not None:
            fields["allowed"] = self.engine_ids
        group = self._cluster.connection.output.new_group(None, label)
        future = self._send(
            target,
            "actor_create",
            (cls, args, kwargs),
            f"{label} or its arguments",
            group,
            **fields,
        )
        self._cluster.wait(future)
        return ActorHandle(self._cluster.id, fields["actor_id"], cls.__qualname__, methods, name)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        block: bool = True,
        progress: bool = True,
        retries: int = 0,
    ) -> Any:
        """Call ``fn`` on each item (load-balanced); return the results in order.

        Blocking, it shows a progress bar (tasks done / total) when the work
        takes longer than half a second; with ``block=False`` it returns the
        list of futures. ``retries`` runs an item again on another engine
        when its engine dies under it, as in ``submit``.
        """
        fields = self._balanced_fields(fn, retries)
        name = getattr(fn, "__name__", repr(fn))
        group = self._cluster.connection.output.new_group(None)
        futures = [
            self._send(None, "apply", (fn, args, {}), f"the arguments of {name}", group, **fields)
            for args in zip(*iterables, strict=False)
        ]
        if not block:
            return futures
        with tqdm(total=len(futures), desc=name, delay=0.5, disable=not progress) as bar:
            pending: set[concurrent.futures.Future[Any]] = set(futures)
            while pending:
                done, pending = self._cluster.wait_any(pending, [f.id for f in futures])
                bar.update(len(done))
        return [f.result() for f in futures]
