"""Carry large buffers between processes of one host through shared memory instead of the socket.

The sender copies a buffer once into a segment (a file in ``/dev/shm``)
and sends its name in the signed message; the receiver maps the segment
and the value is rebuilt over the mapping (one copy in, none out).

Fresh shared-memory pages cost more than the copy itself (the kernel
allocates and zeroes each one), so segments are reused: a segment handed
to one receiver becomes its own; when the last object over its mapping
is gone, the receiver renames the file into the cluster's free pool,
where the next sender on this host takes it (``os.rename`` is atomic, so
two senders never take the same one). Names on the wire are fresh for
every send, and a receiver renames a segment away as it maps it, so a
stale name (a result fetched twice) fails to open instead of showing
other data. A segment sent to several engines at once (a broadcast) is
``shared``: receivers only map it and the sender unlinks it once they all
replied. A gather of large arrays goes the other way: the client makes
one segment (``allocate_shared``) and each engine writes its part into it
at its offset (``write_into``), so the parts are copied once, in parallel.
Names being written or held carry their process's id, so the controller
removes those of a process that is gone (a client killed while it sent a
gigabyte, or holding values) while the cluster runs (``remove_dead_owners``).
The controller removes what is left of a cluster's segments when it stops;
a controller that was killed cannot, so the processes that outlive it (its
engines as they exit, a client that finds it gone) call ``remove_orphaned``.

Mapping a segment with its pages and unmapping it again cost about as much
as copying it (3 + 3 ms against 8 ms for 100 MB here), and a segment goes
round the pool, so each process keeps its mappings (``_MappedFiles``,
keyed by the file's inode, since names change at every send) and drops one
when its file is gone or it has too many.

Layout of names, all under ``SHM_DIR``::

    jd-<cluster>-<uuid>.writing-<pid>   being written by process ``pid``
    jd-<cluster>-<uuid>                 in flight, named in a message
    jd-<cluster>-<uuid>.held-<pid>      mapped by its receiver, process ``pid``
    jd-<cluster>-free-<size>-<uuid>     in the pool, ``size`` bytes long
    jd-<cluster>-started-<pid>          not a segment: an engine's start record (start_record.py)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import mmap
import os
import re
import socket
import sys
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from jupyter_dist import connection_file
from jupyter_dist.connection_file import ClusterInfo
from jupyter_dist.errors import SerializationError

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
# Below this a buffer travels as a frame: the file and mapping cost more than the copy.
SHM_MIN_NBYTES = 1 << 20
# Free segments kept for reuse per cluster and host; beyond this released ones are removed.
POOL_MAX_NBYTES = 1 << 30
# Copies above this run on two threads (the copy releases the GIL); one core does not saturate memory.
PARALLEL_COPY_MIN_NBYTES = 8 << 20
# Mappings of segment files a process keeps for reuse; beyond this the least recently used go.
MAX_KEPT_MAPPINGS = 16

_CLUSTER_ID = re.compile(r"[0-9a-zA-Z]{1,32}")
_NAME = re.compile(r"jd-[0-9a-zA-Z]{1,32}-[0-9a-f]{32}")
_OWNED = re.compile(r"[0-9a-f]{32}\.(?:held|writing)-([0-9]+)")  # after the cluster's prefix


def host_name() -> str:
    """This host's name, as engines report it: senders compare it to pick shared memory."""
    return socket.gethostname()


def pool_for(cluster_id: str) -> SegmentPool | None:
    """The cluster's segments on this host, or None where there is no usable shared memory."""
    if not (sys.platform == "linux" and os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)):
        return None
    if not _CLUSTER_ID.fullmatch(cluster_id):
        return None  # a name we would not put in a path: such a cluster uses frames only
    return SegmentPool(cluster_id)


def remove_orphaned(info: ClusterInfo) -> bool:
    """Remove the cluster's segments on this host if its controller is gone; return whether it did.

    A stopping controller removes them itself; a killed one leaves them, and
    with them memory that nothing frees until the machine restarts. Mappings
    stay valid: values over them live on, only the files go. Safe to call
    from each process that outlives the controller, in any order. Nothing is
    removed while the controller runs, or where it runs on another host.
    """
    pool = pool_for(info.cluster_id)
    if pool is None or connection_file.is_alive(info):
        return False
    pool.remove_all()
    logger.info("removed the shared memory of cluster %s: its controller is gone", info.cluster_id)
    return True


def _prefix(cluster_id: str) -> str:
    return f"jd-{cluster_id}-"


def _copy(dst: memoryview, src: memoryview) -> None:
    """memcpy ``src`` into ``dst``; large copies on two threads when numpy is loaded."""
    numpy = sys.modules.get("numpy")
    nbytes = src.nbytes
    if numpy is None or nbytes < PARALLEL_COPY_MIN_NBYTES:
        dst[:nbytes] = src
        return
    a = numpy.frombuffer(dst, dtype=numpy.uint8, count=nbytes)
    b = numpy.frombuffer(src, dtype=numpy.uint8)
    half = (nbytes // 2) & ~4095
    helper = threading.Thread(target=numpy.copyto, args=(a[:half], b[:half]), daemon=True)
    helper.start()
    numpy.copyto(a[half:], b[half:])
    helper.join()


class _Mapping:
    """One segment file mapped whole, with the open file that tells whether it still exists."""

    __slots__ = ("__weakref__", "close_fd", "fd", "mm", "size", "uses")

    def __init__(self, fd: int, size: int) -> None:
        # MAP_POPULATE maps every page in one call instead of one fault each.
        self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        self.fd = fd
        self.close_fd = weakref.finalize(self, os.close, fd)  # also when dropped while in use
        self.size = size
        self.uses = 0

    def is_live(self) -> bool:
        """Whether the file still has a name (a removed one's inode number may be given again)."""
        return os.fstat(self.fd).st_nlink > 0

    def close(self) -> bool:
        """Unmap; False while something still holds the mapping."""
        try:
            self.mm.close()
        except BufferError:
            return False
        self.close_fd()
        return True


class _MappedFiles:
    """This process's mappings of segment files, kept between uses (any thread)."""

    def __init__(self) -> None:
        # Reentrant: a collection while it is held may finalize a view, which takes it again.
        self._lock = threading.RLock()
        self._by_inode: OrderedDict[tuple[int, int], _Mapping] = OrderedDict()

    def view(
        self, path: str, nbytes: int, released: Callable[[], None] | None = None
    ) -> ctypes.Array[ctypes.c_char]:
        """The first ``nbytes`` of the file at ``path``, mapped; in use until the object returned dies.

        Then ``released`` is called. Raises ``OSError`` when the file cannot
        be opened and ``ValueError`` when it is shorter than ``nbytes``.
        """
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        stat = os.fstat(fd)
        if stat.st_size < nbytes:
            os.close(fd)
            raise ValueError(
                f"segment {os.path.basename(path)} is smaller than the {nbytes} bytes announced"
            )
        key = (stat.st_dev, stat.st_ino)
        with self._lock:
            self._drop_unused()  # first: a deleted file's inode number may be in use again
            mapping = self._by_inode.get(key)
            if mapping is not None and mapping.size == stat.st_size and mapping.is_live():
                os.close(fd)
                self._by_inode.move_to_end(key)
            else:
                try:
                    mapping = _Mapping(fd, stat.st_size)
                except BaseException:
                    os.close(fd)
                    raise
                self._by_inode[key] = mapping  # a stale one in use stays mapped by its users
            mapping.uses += 1
        view = (ctypes.c_char * nbytes).from_buffer(mapping.mm)
        weakref.finalize(view, self._end_use, key, mapping, released)
        return view

    def _end_use(
        self, key: tuple[int, int], mapping: _Mapping, released: Callable[[], None] | None
    ) -> None:
        if released is not None:
            released()  # may remove the file: then the mapping goes too
        with self._lock:
            mapping.uses -= 1
            if mapping.uses or self._by_inode.get(key) is not mapping:
                return
            if not mapping.is_live() or mapping.size > POOL_MAX_NBYTES:  # gone, or never pooled
                del self._by_inode[key]  # unmapped as soon as the view is gone

    def _drop_unused(self) -> None:
        """Unmap what no one uses whose file is gone, and the oldest beyond the limits.

        At most ``MAX_KEPT_MAPPINGS`` mappings, and no more unused bytes than
        the pool keeps: a file the pool removes stays in memory while mapped.
        """
        excess = len(self._by_inode) - MAX_KEPT_MAPPINGS
        excess_nbytes = self._unused_nbytes() - POOL_MAX_NBYTES
        for key, mapping in list(self._by_inode.items()):
            if mapping.uses:
                continue
            too_many = excess > 0 or excess_nbytes > 0
            if (too_many or not mapping.is_live()) and mapping.close():
                self._by_inode.pop(key, None)
                excess -= 1
                excess_nbytes -= mapping.size

    def unused_nbytes(self) -> int:
        with self._lock:
            return self._unused_nbytes()

    def _unused_nbytes(self) -> int:
        return sum(m.size for m in self._by_inode.values() if not m.uses)

    def drop_unused(self) -> None:
        """Unmap what no one uses whose file is gone (a cluster stopped, a full pool), or beyond the limits."""
        with self._lock:
            self._drop_unused()


_mapped_files = _MappedFiles()


def drop_unused_mappings() -> None:
    """Give back the memory of removed segments (a stopped cluster's, a full pool's) kept mapped here."""
    _mapped_files.drop_unused()


def kept_unused_nbytes() -> int:
    """Bytes of segments this process keeps mapped for reuse but no value uses (all resident)."""
    return _mapped_files.unused_nbytes()


def _as_bytes(view: ctypes.Array[ctypes.c_char]) -> memoryview:
    return memoryview(view).cast("B")


class SegmentPool:
    """Segments of one cluster on this host: export buffers into them, map received ones."""

    def __init__(self, cluster_id: str, directory: str = SHM_DIR) -> None:
        if not _CLUSTER_ID.fullmatch(cluster_id):
            raise ValueError(f"cluster id {cluster_id!r} cannot name shared memory")
        self.cluster_id = cluster_id
        self.directory = directory
        self._prefix = _prefix(cluster_id)
        self._free_prefix = f"{self._prefix}free-"

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    # ---- sending --------------------------------------------------------

    def export(self, buf: memoryview, shared: bool = False) -> list[Any]:
        """Copy ``buf`` into a segment; return its descriptor ``[name, nbytes, shared]`` for the message."""
        src = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        nbytes = src.nbytes
        name = f"{self._prefix}{uuid.uuid4().hex}"
        path = self._path(name)
        writing = f"{path}.writing-{os.getpid()}"  # removed by the controller if this process dies
        self._claim(writing, nbytes)
        try:
            with _as_bytes(_mapped_files.view(writing, nbytes)) as dst:
                _copy(dst, src)
            os.rename(writing, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(writing)
            raise
        return [name, nbytes, shared]

    def allocate(self, nbytes: int) -> memoryview:
        """A writable buffer of ``nbytes`` in a segment of this process's own, pooled again when unused.

        For a value built here from parts (a gather): reused pages take the
        copy at memory speed, where fresh memory first pays a fault for
        every 4 KiB. Raises ``OSError`` when shared memory is full.
        """
        name = f"{self._prefix}{uuid.uuid4().hex}"
        path = self._path(name)
        self._claim(path, nbytes)
        return self._hold(path, name, nbytes)

    def allocate_shared(self, nbytes: int) -> tuple[list[Any], memoryview]:
        """A segment of ``nbytes`` that engines write into in place (a gather): its descriptor and a view.

        Its name stays valid while this process uses the view; then the
        segment goes to the pool. Raises ``OSError`` when shared memory is full.
        """
        name = f"{self._prefix}{uuid.uuid4().hex}"
        path = self._path(name)
        self._claim(path, nbytes)
        view = _mapped_files.view(path, nbytes, functools.partial(self._release, path, name))
        return [name, nbytes, True], _as_bytes(view)

    def _claim(self, path: str, nbytes: int) -> None:
        """Rename a free segment to ``path``, or make a new one there; all its pages are allocated."""
        if self._take_free(nbytes, path):
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            # Allocated now, not at first write: writing a page that a full /dev/shm
            # cannot hold would kill this process with SIGBUS (a Docker container's
            # /dev/shm is 64 MB). ENOSPC here instead sends the buffer as a frame.
            os.posix_fallocate(fd, 0, nbytes)
        except OSError:
            os.unlink(path)
            raise
        finally:
            os.close(fd)

    def _take_free(self, nbytes: int, path: str) -> bool:
        """Rename the smallest free segment that fits (at most twice as big) to ``path``."""
        candidates = []
        for entry in os.listdir(self.directory):
            if entry.startswith(self._free_prefix):
                size = _free_size(entry, self._free_prefix)
                if size is not None and nbytes <= size <= 2 * nbytes:
                    candidates.append((size, entry))
        for _, entry in sorted(candidates):
            try:
                os.rename(self._path(entry), path)
            except FileNotFoundError:
                continue  # another sender took it first
            return True
        return False

    def unlink(self, descriptors: Sequence[Sequence[Any]]) -> None:
        """Remove shared segments once every receiver has mapped them (mappings stay valid)."""
        for name, _, _ in descriptors:
            if isinstance(name, str) and name.startswith(self._prefix) and _NAME.fullmatch(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(name))

    # ---- receiving ------------------------------------------------------

    def open(self, descriptor: Sequence[Any]) -> memoryview:
        """Map a received segment; an unshared one returns to the pool when its memory is unused.

        Raises ``FileNotFoundError`` when it is gone (already received once,
        or its cluster stopped) and ``ValueError`` for a malformed descriptor.
        """
        name, nbytes, shared = descriptor
        if not (
            isinstance(name, str)
            and name.startswith(self._prefix)
            and _NAME.fullmatch(name)
            and isinstance(nbytes, int)
            and nbytes > 0
        ):
            raise ValueError(f"not a shared-memory segment of cluster {self.cluster_id}: {name!r}")
        path = self._path(name)
        if shared:
            return _as_bytes(_mapped_files.view(path, nbytes))
        return self._hold(path, name, nbytes)

    def _hold(self, path: str, name: str, nbytes: int) -> memoryview:
        """Rename the segment as taken and map it; it goes into the pool once nothing uses the view."""
        held = f"{path}.held-{os.getpid()}"
        os.rename(path, held)
        try:
            view = _mapped_files.view(held, nbytes, functools.partial(self._release, held, name))
        except ValueError:
            os.rename(held, path)  # not ours to keep: a segment shorter than announced
            raise
        return _as_bytes(view)

    def _release(self, held: str, name: str) -> None:
        """Put a segment nobody maps any more (at path ``held``) into the pool, or remove it if the pool is full."""
        try:
            size = os.stat(held).st_size
            if self._free_nbytes() + size > POOL_MAX_NBYTES:
                os.unlink(held)
            else:
                os.rename(held, self._path(f"{self._free_prefix}{size}-{uuid.uuid4().hex}"))
        except FileNotFoundError:
            pass  # the cluster stopped and removed it
        except OSError as e:
            logger.warning("could not release shared memory %s: %s", name, e)

    def _free_nbytes(self) -> int:
        total = 0
        for entry in os.listdir(self.directory):
            if entry.startswith(self._free_prefix):
                total += _free_size(entry, self._free_prefix) or 0
        return total

    def remove_dead_owners(self) -> None:
        """Remove segments being written or held by processes that are gone (the controller, each second).

        Nothing else can use them: a segment being written was never named
        in a message, and a held one was mapped by its holder alone.
        """
        for entry in os.listdir(self.directory):
            owned = (
                _OWNED.fullmatch(entry[len(self._prefix) :])
                if entry.startswith(self._prefix)
                else None
            )
            if owned is not None and not _is_running(int(owned[1])):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(entry))
                logger.info("removed shared memory %s: its process is gone", entry)

    def remove_all(self) -> None:
        """Remove every segment of this cluster on this host (the controller, when it stops)."""
        for entry in os.listdir(self.directory):
            if entry.startswith(self._prefix):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(entry))


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's: not ours to judge
    return True


def segment_names(descriptors: Any) -> tuple[str, ...]:
    """The names in a message's ``shm`` descriptors (``[index, name, nbytes, shared]``), malformed ones left out."""
    if not isinstance(descriptors, list):
        return ()
    return tuple(
        d[1]
        for d in descriptors
        if isinstance(d, list) and len(d) == 4 and isinstance(d[1], str) and _NAME.fullmatch(d[1])
    )


def _free_size(entry: str, free_prefix: str) -> int | None:
    size, _, _ = entry[len(free_prefix) :].partition("-")
    return int(size) if size.isdigit() else None


def export_buffers(
    pool: SegmentPool | None, raw: Sequence[memoryview], shared: bool = False
) -> tuple[list[memoryview], list[list[Any]]]:
    """Move the large buffers of a message into segments.

    Returns the buffers that still travel as frames and the descriptors
    ``[index, name, nbytes, shared]`` of the others (``index``: the place
    of the buffer among all of the message's out-of-band buffers).
    """
    if pool is None:
        return list(raw), []
    frames: list[memoryview] = []
    descriptors: list[list[Any]] = []
    for index, buf in enumerate(raw):
        if buf.nbytes >= SHM_MIN_NBYTES:
            try:
                descriptors.append([index, *pool.export(buf, shared)])
                continue
            except OSError as e:  # /dev/shm full: the socket still works
                logger.warning(
                    "shared memory refused %d bytes (%s); sent as a frame", buf.nbytes, e
                )
        frames.append(buf)
    return frames, descriptors


@dataclass(frozen=True, slots=True)
class ArrayLayout:
    """What an engine sends instead of a large array asked for a gather: where the client can put it.

    The client adds up the engines' layouts, makes one segment for the whole
    array and asks each engine to ``write_into`` it at its offset.
    """

    dtype: str  # numpy's dtype.str
    shape: tuple[int, ...]
    nbytes: int

    @classmethod
    def of(cls, value: Any) -> ArrayLayout | None:
        """The layout of a large, plain (C-contiguous, no objects or fields) numpy array, else None."""
        numpy = sys.modules.get("numpy")
        if numpy is None or not isinstance(value, numpy.ndarray):
            return None
        dtype = value.dtype
        if dtype.hasobject or dtype.fields is not None or not value.flags.c_contiguous:
            return None
        if value.nbytes < SHM_MIN_NBYTES:
            return None
        return cls(dtype.str, tuple(value.shape), int(value.nbytes))


def write_into(
    pool: SegmentPool | None,
    descriptor: Sequence[Any],
    offset: int,
    expected: ArrayLayout,
    value: Any,
) -> None:
    """Copy an array into a segment made by ``allocate_shared`` at ``offset`` (an engine's part of a gather).

    ``expected`` is the layout the client planned with: the value must still have it.
    """
    if pool is None:
        raise ValueError("the request names shared memory, but this host has none")
    if ArrayLayout.of(value) != expected:
        raise ValueError("the value changed while it was gathered; gather it again")
    _, nbytes, _ = descriptor
    if not (isinstance(offset, int) and 0 <= offset <= nbytes - expected.nbytes):
        raise ValueError(f"offset {offset!r} does not fit the segment")
    dst = pool.open(descriptor)
    try:
        _copy(dst[offset : offset + expected.nbytes], memoryview(value.reshape(-1).view("u1")))
    finally:
        dst.release()


def copy_into(dst: memoryview, parts: Sequence[memoryview]) -> None:
    """Copy ``parts`` back to back into ``dst`` (large ones on two threads)."""
    offset = 0
    for part in parts:
        src = part.cast("B") if part.format != "B" or part.ndim != 1 else part
        _copy(dst[offset : offset + src.nbytes], src)
        offset += src.nbytes


def import_buffers(
    pool: SegmentPool | None, frames: Sequence[memoryview], descriptors: Sequence[Any]
) -> list[memoryview]:
    """Rebuild the out-of-band buffers of a message from its frames and mapped segments.

    Raises ``SerializationError`` when the descriptors do not fit the
    message or a segment cannot be opened (a result in shared memory is
    received once; a stopped cluster's segments are gone).
    """
    if not descriptors:
        return list(frames)
    try:
        return _import_buffers(pool, frames, descriptors)
    except (OSError, ValueError) as e:
        raise SerializationError(
            f"Cannot map the shared memory of a message ({e}). Shared memory holds a value "
            "until it is received once; fetch results once, while the cluster runs."
        ) from e


def _import_buffers(
    pool: SegmentPool | None, frames: Sequence[memoryview], descriptors: Sequence[Any]
) -> list[memoryview]:
    if pool is None:
        raise ValueError("the message names shared memory, but this host has none")
    total = len(frames) + len(descriptors)
    out: list[memoryview | None] = [None] * total
    for descriptor in descriptors:
        if not (isinstance(descriptor, list | tuple) and len(descriptor) == 4):
            raise ValueError(f"malformed shared-memory descriptor {descriptor!r}")
        index = descriptor[0]
        if not isinstance(index, int) or not 0 <= index < total or out[index] is not None:
            raise ValueError(f"shared-memory buffer index {index!r} does not fit the message")
        out[index] = pool.open(descriptor[1:])
    rest = iter(frames)
    return [buf if buf is not None else next(rest) for buf in out]
