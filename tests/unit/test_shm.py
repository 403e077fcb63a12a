"""Shared-memory segments: export and map, the pool, and names that must not be trusted."""

from __future__ import annotations

import gc
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from jupyter_dist import serialize, shm
from jupyter_dist.client import sequences
from jupyter_dist.errors import SerializationError


@pytest.fixture
def pool(tmp_path: Path) -> shm.SegmentPool:
    return shm.SegmentPool("c0ffee", directory=str(tmp_path))


def _send(pool: shm.SegmentPool, value: object, shared: bool = False) -> tuple[bytes, list, list]:
    pickled, raw = serialize.serialize(value, "value")
    frames, descriptors = shm.export_buffers(pool, raw, shared)
    return pickled, frames, descriptors


def test_a_large_array_travels_by_name_and_comes_back_equal(pool: shm.SegmentPool) -> None:
    arr = np.arange(shm.SHM_MIN_NBYTES // 8 + 5, dtype=np.int64)
    small = np.arange(10)
    pickled, frames, descriptors = _send(pool, {"big": arr, "small": small})
    assert frames == []
    assert len(descriptors) == 1
    value = serialize.deserialize(pickled, shm.import_buffers(pool, frames, descriptors), "v")
    np.testing.assert_array_equal(value["big"], arr)
    np.testing.assert_array_equal(value["small"], small)


def test_buffers_below_the_threshold_stay_frames(pool: shm.SegmentPool) -> None:
    _, frames, descriptors = _send(pool, np.zeros(100_000, dtype=np.uint8))
    assert len(frames) == 1
    assert descriptors == []
    assert os.listdir(pool.directory) == []


def test_a_released_segment_returns_to_the_pool_and_is_reused(pool: shm.SegmentPool) -> None:
    arr = np.ones(shm.SHM_MIN_NBYTES, dtype=np.uint8)
    pickled, frames, descriptors = _send(pool, arr)
    value = serialize.deserialize(pickled, shm.import_buffers(pool, frames, descriptors), "v")
    assert [".held-" in e for e in os.listdir(pool.directory)] == [True]
    del value
    gc.collect()
    (free,) = os.listdir(pool.directory)
    assert free.startswith("jd-c0ffee-free-")
    _, _, again = _send(pool, arr)
    assert os.listdir(pool.directory) == [again[0][1]]  # the free one, renamed for this send


def test_a_segment_is_received_once(pool: shm.SegmentPool) -> None:
    _pickled, frames, descriptors = _send(pool, np.ones(shm.SHM_MIN_NBYTES, dtype=np.uint8))
    kept = shm.import_buffers(pool, frames, descriptors)
    with pytest.raises(SerializationError, match="received once"):
        shm.import_buffers(pool, frames, descriptors)
    del kept


def test_a_shared_segment_is_mapped_by_many_and_unlinked_by_its_sender(
    pool: shm.SegmentPool,
) -> None:
    arr = np.ones(shm.SHM_MIN_NBYTES, dtype=np.uint8)
    pickled, frames, descriptors = _send(pool, arr, shared=True)
    values = [
        serialize.deserialize(pickled, shm.import_buffers(pool, frames, descriptors), "v")
        for _ in range(3)
    ]
    pool.unlink([d[1:] for d in descriptors])
    assert os.listdir(pool.directory) == []
    assert all(int(v.sum()) == arr.size for v in values)  # mappings outlive the name


def _mappings_of(pool: shm.SegmentPool) -> list[str]:
    """This process's mappings of the pool's files, as /proc/self/maps lists them."""
    with open("/proc/self/maps") as maps:
        return [line for line in maps if f" {pool.directory}/" in line]


def _address(value: np.ndarray) -> int:
    return int(value.__array_interface__["data"][0])


def test_a_segment_that_comes_round_again_is_not_mapped_again(pool: shm.SegmentPool) -> None:
    arr = np.ones(shm.SHM_MIN_NBYTES, dtype=np.uint8)
    addresses = []
    for _ in range(4):
        pickled, frames, descriptors = _send(pool, arr)
        value = serialize.deserialize(pickled, shm.import_buffers(pool, frames, descriptors), "v")
        addresses.append(_address(value))
        del value  # back to the pool, still mapped here
    assert len(set(addresses)) == 1
    assert len(_mappings_of(pool)) == 1


def test_the_mapping_of_a_removed_segment_goes_with_its_last_user(pool: shm.SegmentPool) -> None:
    pickled, frames, descriptors = _send(pool, np.ones(shm.SHM_MIN_NBYTES, dtype=np.uint8), True)
    value = serialize.deserialize(pickled, shm.import_buffers(pool, frames, descriptors), "v")
    pool.unlink([d[1:] for d in descriptors])
    assert len(_mappings_of(pool)) == 1  # the value still needs it
    del value
    assert _mappings_of(pool) == []


def test_a_stopped_clusters_mappings_are_given_back(pool: shm.SegmentPool) -> None:
    for _ in range(2):
        _send(pool, np.ones(shm.SHM_MIN_NBYTES, dtype=np.uint8))  # sent, never received
    assert len(_mappings_of(pool)) == 2
    pool.remove_all()
    shm.drop_unused_mappings()
    assert _mappings_of(pool) == []


def test_a_segment_too_large_for_the_pool_is_not_kept_mapped(
    pool: shm.SegmentPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shm, "POOL_MAX_NBYTES", shm.SHM_MIN_NBYTES)
    _send(pool, np.ones(2 * shm.SHM_MIN_NBYTES, dtype=np.uint8))  # its receiver will remove it
    assert _mappings_of(pool) == []


def test_unused_mappings_hold_no_more_than_the_pool_keeps(
    pool: shm.SegmentPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shm, "POOL_MAX_NBYTES", 3 * shm.SHM_MIN_NBYTES)
    for _ in range(6):
        _send(pool, np.ones(shm.SHM_MIN_NBYTES, dtype=np.uint8))  # six segments, none received
    assert len(_mappings_of(pool)) <= 4  # the pool's worth, and the newest


@pytest.mark.parametrize(
    "descriptor",
    [
        [0, "../etc/passwd", 10, False],
        [0, "jd-other-" + "0" * 32, 10, False],
        [0, "jd-c0ffee-" + "0" * 32, -1, False],
        [5, "jd-c0ffee-" + "0" * 32, 10, False],
        ["x"],
    ],
    ids=["path", "other-cluster", "negative-size", "index-out-of-range", "malformed"],
)
def test_untrusted_descriptors_are_refused(pool: shm.SegmentPool, descriptor: list) -> None:
    with pytest.raises(SerializationError):
        shm.import_buffers(pool, [], [descriptor])


def test_remove_all_leaves_no_segment_of_the_cluster(pool: shm.SegmentPool) -> None:
    for _ in range(2):
        _send(pool, np.ones(shm.SHM_MIN_NBYTES, dtype=np.uint8))
    other = Path(pool.directory, "jd-beef-" + "1" * 32)
    other.write_bytes(b"")
    pool.remove_all()
    assert os.listdir(pool.directory) == [other.name]


def test_pickle_of_a_mapped_array_is_an_ordinary_copy(pool: shm.SegmentPool) -> None:
    pickled, frames, descriptors = _send(pool, np.arange(shm.SHM_MIN_NBYTES, dtype=np.uint8))
    value = serialize.deserialize(pickled, shm.import_buffers(pool, frames, descriptors), "v")
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(value)), value)


def test_a_full_shared_memory_sends_the_buffer_as_a_frame(
    pool: shm.SegmentPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, offset: int, nbytes: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)  # stands in for a full /dev/shm
    arr = np.ones(shm.SHM_MIN_NBYTES, dtype=np.uint8)
    pickled, frames, descriptors = _send(pool, arr)
    assert descriptors == []
    assert len(frames) == 1
    assert os.listdir(pool.directory) == []
    np.testing.assert_array_equal(serialize.deserialize(pickled, frames, "v"), arr)


def test_a_gather_joins_large_parts_in_a_pooled_segment(pool: shm.SegmentPool) -> None:
    parts = [np.arange(300_000, dtype=np.float64).reshape(-1, 3) + k for k in range(3)]
    joined = sequences.join(parts, "x", pool.allocate)
    np.testing.assert_array_equal(joined, np.concatenate(parts))
    assert [".held-" in e for e in os.listdir(pool.directory)] == [True]
    del joined
    gc.collect()
    assert os.listdir(pool.directory)[0].startswith("jd-c0ffee-free-")
    small = [np.arange(3), np.arange(2)]
    np.testing.assert_array_equal(sequences.join(small, "y", pool.allocate), np.r_[0:3, 0:2])


# ---- a gather written in place by the engines ------------------------------------


def test_engines_write_their_parts_into_one_segment_that_returns_to_the_pool(
    pool: shm.SegmentPool,
) -> None:
    parts = [np.arange(200_000, dtype=np.float64).reshape(-1, 2) + k for k in range(2)]
    layouts = [shm.ArrayLayout.of(p) for p in parts]
    assert layouts[0] == shm.ArrayLayout("<f8", (100_000, 2), 1_600_000)
    descriptor, view = pool.allocate_shared(sum(layout.nbytes for layout in layouts))
    engine_side = shm.SegmentPool("c0ffee", directory=pool.directory)  # as another process would

    shm.write_into(engine_side, descriptor, 0, layouts[0], parts[0])
    shm.write_into(engine_side, descriptor, layouts[0].nbytes, layouts[1], parts[1])

    joined = sequences.array_over(view, "<f8", (200_000, 2))
    np.testing.assert_array_equal(joined, np.concatenate(parts))
    del view, joined
    gc.collect()
    assert [e.startswith("jd-c0ffee-free-") for e in os.listdir(pool.directory)] == [True]


@pytest.mark.parametrize(
    "value",
    [
        np.zeros(10, dtype=np.float64),  # too small to be worth a segment
        np.zeros((1000, 1000), dtype=np.float64)[:, ::2],  # not contiguous
        np.array([object()] * 200_000, dtype=object),
        np.zeros(200_000, dtype=[("a", "f8")]),  # fields: dtype.str would lose them
        [0.0] * 200_000,
    ],
)
def test_only_large_plain_arrays_have_a_layout(value: object) -> None:
    assert shm.ArrayLayout.of(value) is None


def test_a_part_that_changed_since_its_layout_was_sent_is_refused(pool: shm.SegmentPool) -> None:
    part = np.ones(shm.SHM_MIN_NBYTES // 8, dtype=np.float64)
    layout = shm.ArrayLayout.of(part)
    assert layout is not None
    descriptor, _view = pool.allocate_shared(layout.nbytes)

    with pytest.raises(ValueError, match="changed while it was gathered"):
        shm.write_into(pool, descriptor, 0, layout, part.astype(np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        shm.write_into(pool, descriptor, 8, layout, part)


def _pid_never_given() -> int:
    """A pid no process has: pids stay below the kernel's pid_max."""
    return int(Path("/proc/sys/kernel/pid_max").read_text())


def test_segments_of_a_process_that_is_gone_are_removed(pool: shm.SegmentPool) -> None:
    arr = np.ones(shm.SHM_MIN_NBYTES, dtype=np.uint8)
    pickled, frames, descriptors = _send(pool, arr)
    value = serialize.deserialize(pickled, shm.import_buffers(pool, frames, descriptors), "v")
    dead = _pid_never_given()
    for kind in ("held", "writing"):
        Path(pool.directory, f"jd-c0ffee-{'0' * 31}{len(kind) % 10}.{kind}-{dead}").touch()
    _send(pool, arr)  # in flight: no owner named
    pool.remove_dead_owners()
    names = os.listdir(pool.directory)
    assert str(dead) not in " ".join(names)
    assert sum(f".held-{os.getpid()}" in e for e in names) == 1  # ours stays
    assert len(names) == 2
    del value
