"""Splitting sequences into balanced chunks for scatter, and joining them back for gather."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch

from jupyter_dist.client.sequences import chunk_bounds, join, split
from jupyter_dist.errors import JupyterDistError


@pytest.mark.parametrize("length", [0, 1, 2, 3, 7, 10, 100, 101])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 16])
def test_chunk_bounds_cover_everything_in_order_with_sizes_differing_by_at_most_one(
    length: int, parts: int
) -> None:
    bounds = chunk_bounds(length, parts)

    assert len(bounds) == parts
    assert bounds[0][0] == 0
    assert bounds[-1][1] == length
    assert all(stop == next_start for (_, stop), (next_start, _) in itertools.pairwise(bounds))
    sizes = [stop - start for start, stop in bounds]
    assert sum(sizes) == length
    assert max(sizes) - min(sizes) <= 1


def test_chunk_bounds_gives_the_extra_items_to_the_first_parts() -> None:
    assert chunk_bounds(5, 3) == [(0, 2), (2, 4), (4, 5)]


def test_fewer_items_than_parts_leaves_the_last_parts_empty() -> None:
    assert chunk_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]


@pytest.mark.parametrize(
    "value",
    [list(range(10)), tuple("abcdefg"), [], [1]],
    ids=["list", "tuple", "empty", "one"],
)
@pytest.mark.parametrize("parts", [1, 3, 4, 12])
def test_split_then_join_gives_back_lists_and_tuples(value: Any, parts: int) -> None:
    chunks = split(value, parts, "x")

    assert len(chunks) == parts
    assert all(type(c) is type(value) for c in chunks)
    if value:
        assert join(chunks, "x") == value


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_split_then_join_gives_back_a_numpy_array(parts: int) -> None:
    array = np.arange(30.0).reshape(10, 3)

    chunks = split(array, parts, "a")
    joined = join(chunks, "a")

    assert [len(c) for c in chunks] == [stop - start for start, stop in chunk_bounds(10, parts)]
    np.testing.assert_array_equal(joined, array)


def test_split_numpy_chunks_are_views_not_copies() -> None:
    array = np.arange(10)

    chunks = split(array, 3, "a")

    assert all(np.shares_memory(c, array) for c in chunks)


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_split_then_join_gives_back_a_torch_tensor(parts: int) -> None:
    tensor = torch.arange(40, dtype=torch.bfloat16).reshape(10, 4)

    chunks = split(tensor, parts, "t")
    joined = join(chunks, "t")

    assert all(isinstance(c, torch.Tensor) for c in chunks)
    assert [c.shape[1] for c in chunks] == [4] * parts
    assert torch.equal(joined, tensor)


def test_join_of_no_chunks_is_an_empty_list() -> None:
    assert join([], "x") == []


@pytest.mark.parametrize(
    "value",
    [42, {"a": 1}, {1, 2, 3}, (i for i in range(3)), None],
    ids=["int", "dict", "set", "generator", "None"],
)
def test_split_explains_what_cannot_be_scattered(value: Any) -> None:
    with pytest.raises(JupyterDistError) as caught:
        split(value, 2, "data")

    message = str(caught.value)
    assert f"Cannot scatter 'data' ({type(value).__name__})" in message
    assert "c.push(" in message
    assert isinstance(caught.value.__cause__, TypeError)


@pytest.mark.parametrize(
    "chunks",
    [[1, 2], [{"a": 1}, {"b": 2}], [None, None]],
    ids=["ints", "dicts", "Nones"],
)
def test_join_explains_what_cannot_be_gathered(chunks: list[Any]) -> None:
    with pytest.raises(JupyterDistError) as caught:
        join(chunks, "result")

    message = str(caught.value)
    assert (
        f"Cannot gather 'result': the engines hold {type(chunks[0]).__name__} values, which are not sequences"
        in message
    )
    assert "c.pull(" in message


@pytest.mark.parametrize("parts", [1, 3, 4, 12])
@pytest.mark.parametrize(
    "value",
    [range(10), range(3, 40, 7), range(10, 0, -2), "abcdefghij", b"abcdefghij", bytearray(b"xyz")],
    ids=["range", "stepped-range", "falling-range", "str", "bytes", "bytearray"],
)
def test_split_then_join_gives_back_what_was_scattered(value: Any, parts: int) -> None:
    joined = join(split(value, parts, "x"), "x")
    assert type(joined) is type(value)
    assert joined == value


def test_ranges_that_do_not_follow_each_other_join_into_a_list() -> None:
    assert join([range(0, 2), range(10, 12)], "x") == [0, 1, 10, 11]


def test_split_then_join_gives_back_a_pandas_frame_by_position() -> None:
    import pandas

    frame = pandas.DataFrame({"a": range(7), "b": list("abcdefg")}, index=list(range(70, 0, -10)))
    chunks = split(frame, 3, "df")
    assert [len(c) for c in chunks] == [3, 2, 2]
    pandas.testing.assert_frame_equal(join(chunks, "df"), frame)
    series = frame["a"]
    pandas.testing.assert_series_equal(join(split(series, 2, "s"), "s"), series)


@pytest.mark.parametrize(
    ("chunks", "kind"),
    [
        ([np.array(1.0), np.array(2.0)], "numpy arrays"),
        ([torch.tensor(1.0), torch.tensor(2.0)], "torch tensors"),
    ],
    ids=["numpy", "torch"],
)
def test_join_explains_that_single_numbers_have_no_axis(chunks: list[Any], kind: str) -> None:
    with pytest.raises(JupyterDistError, match=f"the engines hold 0-d {kind} \\(single numbers\\)"):
        join(chunks, "loss")
