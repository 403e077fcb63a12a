"""serialize/deserialize: round trips, out-of-band buffers without copies, and clear errors."""

from __future__ import annotations

import math
import sqlite3
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from jupyter_dist import serialize as serialize_module
from jupyter_dist.errors import SerializationError
from jupyter_dist.serialize import OUT_OF_BAND_MIN_NBYTES, _function_cache, deserialize, serialize
from tests.sent_from_gpu import SentFromGpu

LARGE_NBYTES = 4 * OUT_OF_BAND_MIN_NBYTES


def round_trip(value: Any) -> Any:
    """Serialize, copy every buffer into writable memory (as a received frame is), load."""
    pickled, buffers = serialize(value, "'value'")
    return deserialize(pickled, [memoryview(bytearray(b)) for b in buffers], "'value'")


def make_adder(n: int) -> Callable[[int], int]:
    def add(x: int) -> int:
        return x + n

    return add


# ---- plain values and code ----------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -(2**100),
        3.5,
        complex(1, -2),
        "naïve text",
        b"\x00bytes",
        bytearray(b"mutable"),
        [1, [2, [3]]],
        (1, "two", 3.0),
        {"a": {"b": [1, 2]}, 3: None},
        {1, 2, 3},
        frozenset({"x"}),
        range(2, 10, 3),
    ],
    ids=repr,
)
def test_plain_values_round_trip(value: Any) -> None:
    assert round_trip(value) == value


def test_small_bytes_stay_inside_the_pickle() -> None:
    _, buffers = serialize(b"x" * 100, "'b'")
    assert buffers == []


def test_a_lambda_round_trips() -> None:
    square = round_trip(lambda x: x * x)
    assert square(7) == 49


def test_a_closure_round_trips_with_its_captured_value() -> None:
    add_three = round_trip(make_adder(3))
    assert add_three(4) == 7


def test_a_function_defined_inside_a_test_round_trips() -> None:
    offset = 10

    def shifted(values: list[int]) -> list[int]:
        return [v + offset for v in values]

    assert round_trip(shifted)([1, 2]) == [11, 12]


# ---- numpy ----------------------------------------------------------------------


def test_a_large_numpy_array_goes_out_of_band() -> None:
    array = np.arange(LARGE_NBYTES // 8, dtype=np.float64)

    pickled, buffers = serialize(array, "'a'")

    assert [b.nbytes for b in buffers] == [array.nbytes]
    assert len(pickled) < 1024
    np.testing.assert_array_equal(round_trip(array), array)


def test_a_small_numpy_array_stays_in_band() -> None:
    array = np.arange(10, dtype=np.int32)

    _, buffers = serialize(array, "'a'")

    assert buffers == []
    np.testing.assert_array_equal(round_trip(array), array)


@pytest.mark.parametrize(
    ("nbytes", "n_buffers"),
    [(OUT_OF_BAND_MIN_NBYTES - 1, 0), (OUT_OF_BAND_MIN_NBYTES, 1)],
    ids=["just-below", "at-threshold"],
)
def test_the_out_of_band_threshold_is_64_kib(nbytes: int, n_buffers: int) -> None:
    _, buffers = serialize(np.zeros(nbytes, dtype=np.uint8), "'a'")
    assert len(buffers) == n_buffers


def test_a_strided_numpy_array_round_trips() -> None:
    array = np.arange(LARGE_NBYTES // 4, dtype=np.float64)[::2]
    assert not array.flags.c_contiguous

    result = round_trip(array)

    np.testing.assert_array_equal(result, array)


def test_a_fortran_ordered_numpy_array_round_trips_in_its_order() -> None:
    array = np.asfortranarray(np.arange(LARGE_NBYTES // 8, dtype=np.float64).reshape(256, -1))

    result = round_trip(array)

    np.testing.assert_array_equal(result, array)
    assert result.flags.f_contiguous


@pytest.mark.parametrize("shape", [(0,), (0, 3), (5, 0)])
def test_an_empty_numpy_array_round_trips(shape: tuple[int, ...]) -> None:
    array = np.empty(shape, dtype=np.float32)

    result = round_trip(array)

    assert result.shape == shape
    assert result.dtype == np.float32


def test_numpy_arrays_inside_containers_round_trip() -> None:
    value: dict[str, Any] = {"big": np.ones(LARGE_NBYTES // 8), "small": [np.arange(3)], "n": 2}

    result = round_trip(value)

    np.testing.assert_array_equal(result["big"], value["big"])
    np.testing.assert_array_equal(result["small"][0], value["small"][0])
    assert result["n"] == 2


def test_a_large_numpy_array_is_rebuilt_over_the_given_buffer_without_a_copy() -> None:
    pickled, buffers = serialize(np.arange(LARGE_NBYTES // 8, dtype=np.float64), "'a'")
    received = bytearray(buffers[0])

    result = deserialize(pickled, [memoryview(received)], "'a'")

    assert np.shares_memory(result, np.frombuffer(received, dtype=np.uint8))
    assert result.flags.writeable
    result[0] = 42.0
    assert np.frombuffer(received, dtype=np.float64)[0] == 42.0


def test_a_numpy_array_over_a_read_only_buffer_is_read_only() -> None:
    pickled, buffers = serialize(np.arange(LARGE_NBYTES // 8, dtype=np.float64), "'a'")

    result = deserialize(pickled, [memoryview(bytes(buffers[0]))], "'a'")

    assert not result.flags.writeable


# ---- torch ----------------------------------------------------------------------

TORCH_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
]


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("n", [5, LARGE_NBYTES], ids=["small", "large"])
def test_a_cpu_tensor_round_trips_with_its_dtype_and_shape(dtype: torch.dtype, n: int) -> None:
    tensor = torch.arange(n).reshape(-1, 1).to(dtype)

    result = round_trip(tensor)

    assert result.dtype == dtype
    assert result.shape == tensor.shape
    assert torch.equal(result, tensor)


def test_a_0_dim_tensor_round_trips() -> None:
    result = round_trip(torch.tensor(2.5))
    assert result.shape == ()
    assert result.item() == 2.5


@pytest.mark.parametrize("shape", [(0,), (0, 4), (3, 0, 2)])
def test_an_empty_tensor_round_trips(shape: tuple[int, ...]) -> None:
    result = round_trip(torch.empty(shape, dtype=torch.float32))
    assert result.shape == shape
    assert result.dtype == torch.float32


def test_requires_grad_survives_and_the_result_is_a_leaf() -> None:
    tensor = torch.ones(3, requires_grad=True) * 2  # not a leaf on this side

    result = round_trip(tensor)

    assert result.requires_grad
    assert result.is_leaf
    assert torch.equal(result.detach(), tensor.detach())


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(20_000.0).reshape(100, 200).T,
        lambda: torch.arange(20_000.0)[::3],
        lambda: torch.arange(100.0).reshape(10, 10)[2:5, 3:7],
    ],
    ids=["transposed", "strided", "sub-block"],
)
def test_a_non_contiguous_tensor_round_trips(make: Callable[[], torch.Tensor]) -> None:
    tensor = make()
    assert not tensor.is_contiguous()

    result = round_trip(tensor)

    assert torch.equal(result, tensor)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj(),
        lambda: torch._neg_view(torch.tensor([1.0, -2.0])),
    ],
    ids=["conjugated", "negated"],
)
def test_a_lazily_conjugated_or_negated_tensor_round_trips(
    make: Callable[[], torch.Tensor],
) -> None:
    tensor = make()
    assert tensor.is_conj() or tensor.is_neg()

    result = round_trip(tensor)

    assert torch.equal(result, tensor.resolve_conj().resolve_neg())


def test_a_large_contiguous_tensor_is_sent_from_its_own_memory() -> None:
    tensor = torch.arange(LARGE_NBYTES // 4, dtype=torch.float32)

    _, buffers = serialize(tensor, "'t'")

    assert len(buffers) == 1
    assert np.shares_memory(np.frombuffer(buffers[0], dtype=np.uint8), tensor.numpy())


@pytest.mark.parametrize("requires_grad", [True, False])
def test_a_parameter_comes_back_a_parameter_through_the_tensor_reducer(requires_grad: bool) -> None:
    parameter = torch.nn.Parameter(torch.randn(LARGE_NBYTES // 4), requires_grad=requires_grad)

    pickled, buffers = serialize(parameter, "'p'")
    result = round_trip(parameter)

    assert len(buffers) == 1  # its data went out of band, not through torch.save
    assert b"_load_from_bytes" not in pickled
    assert type(result) is torch.nn.Parameter
    assert result.requires_grad is requires_grad
    assert torch.equal(result.detach(), parameter.detach())


def test_a_state_dict_round_trips_and_loads_into_a_module() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    x = torch.randn(5, 8)

    state = round_trip(model.state_dict())
    copy = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    copy.load_state_dict(state)

    assert list(state) == list(model.state_dict())
    assert state["1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(copy.eval()(x), model.eval()(x))


# ---- CUDA tensors arriving ------------------------------------------------------


@pytest.fixture
def no_warning_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process has not yet warned that a CUDA tensor stayed on its CPU."""
    monkeypatch.setattr(serialize_module, "_has_warned_kept_on_cpu", False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this process has a GPU")
@pytest.mark.usefixtures("no_warning_yet")
def test_a_cuda_tensor_stays_on_the_cpu_without_a_gpu_and_warns_once() -> None:
    tensor = torch.randn(LARGE_NBYTES // 4).reshape(-1, 2)
    small = torch.tensor([1, 2, 3])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # each warning raised is seen: only ours keeps it to one
        first = round_trip(SentFromGpu(tensor, "cuda:3"))
        second = round_trip([SentFromGpu(small, "cuda:0"), SentFromGpu(small, "cuda")])

    assert first.device.type == "cpu"
    assert torch.equal(first, tensor)
    assert all(t.device.type == "cpu" and torch.equal(t, small) for t in second)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "A CUDA tensor arrived in a process without a usable GPU" in messages[0]
    assert "kept on the CPU" in messages[0]
    assert "%dist start --gpus all" in messages[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.usefixtures("no_warning_yet")
def test_a_cuda_tensor_lands_on_the_current_gpu_whatever_its_index_was() -> None:
    tensor = torch.randn(LARGE_NBYTES // 4)

    result = round_trip(SentFromGpu(tensor, f"cuda:{torch.cuda.device_count() + 3}"))

    assert result.device == torch.device("cuda", torch.cuda.current_device())
    assert torch.equal(result.cpu(), tensor)
    assert not serialize_module._has_warned_kept_on_cpu


def test_a_slice_of_a_large_tensor_sends_only_its_own_elements() -> None:
    # torch's own pickling would send the whole storage behind the view.
    big = torch.zeros(1_000_000)

    pickled, buffers = serialize(big[:10], "'part'")

    assert buffers == []
    assert len(pickled) < 1024


def test_a_large_tensor_is_rebuilt_over_the_given_buffer_without_a_copy() -> None:
    pickled, buffers = serialize(torch.arange(LARGE_NBYTES // 4, dtype=torch.float32), "'t'")
    assert len(buffers) == 1
    received = bytearray(buffers[0])

    result = deserialize(pickled, [memoryview(received)], "'t'")

    assert np.shares_memory(result.numpy(), np.frombuffer(received, dtype=np.uint8))
    result[0] = 42.0  # writable, and the write lands in the buffer
    assert np.frombuffer(received, dtype=np.float32)[0] == 42.0


def test_tensors_inside_containers_round_trip() -> None:
    value = {"weights": torch.randn(LARGE_NBYTES // 4), "bias": torch.zeros(3)}

    result = round_trip(value)

    assert torch.equal(result["weights"], value["weights"])
    assert torch.equal(result["bias"], value["bias"])


# ---- errors ---------------------------------------------------------------------


def _numbers() -> Iterator[int]:
    yield 1


@pytest.mark.parametrize(
    ("make", "type_name"),
    [
        (threading.Lock, "_thread.lock"),
        (lambda: sqlite3.connect(":memory:"), "sqlite3.Connection"),
        (_numbers, "generator"),
    ],
    ids=["lock", "sqlite3", "generator"],
)
def test_serialize_names_the_value_and_its_type_when_it_cannot_be_pickled(
    make: Callable[[], Any], type_name: str
) -> None:
    value = make()

    with pytest.raises(SerializationError) as caught:
        serialize(value, "'conn'")

    message = str(caught.value)
    assert f"Cannot send 'conn' ({type_name}): it cannot be pickled" in message
    assert "Create such objects on the engines" in message
    assert caught.value.__cause__ is not None
    if isinstance(value, sqlite3.Connection):
        value.close()


@pytest.fixture
def class_of_a_vanished_module(monkeypatch: pytest.MonkeyPatch) -> type:
    """A class pickled by reference to a module the receiving side does not have."""
    module = types.ModuleType("jd_module_only_the_sender_has")
    module.__file__ = (
        "/nowhere/jd_module_only_the_sender_has.py"  # importable-looking: by reference
    )
    exec("class Point:\n    x = 1\n", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.Point  # type: ignore[no-any-return]


def test_deserialize_names_a_module_that_is_not_installed(
    class_of_a_vanished_module: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    pickled, buffers = serialize(class_of_a_vanished_module(), "'p'")
    monkeypatch.delitem(sys.modules, "jd_module_only_the_sender_has")

    with pytest.raises(SerializationError) as caught:
        deserialize(pickled, buffers, "the result of task t1")

    message = str(caught.value)
    assert "Cannot load the result of task t1" in message
    assert "module 'jd_module_only_the_sender_has' is not installed here" in message
    assert isinstance(caught.value.__cause__, ModuleNotFoundError)


def test_deserialize_rejects_a_truncated_pickle() -> None:
    pickled, _ = serialize({"a": list(range(100))}, "'a'")

    with pytest.raises(SerializationError, match="Cannot load 'a'"):
        deserialize(pickled[: len(pickled) // 2], [], "'a'")


def test_deserialize_fails_clearly_when_out_of_band_buffers_are_missing() -> None:
    pickled, buffers = serialize(np.zeros(LARGE_NBYTES), "'a'")
    assert buffers

    with pytest.raises(SerializationError, match="Cannot load 'a'"):
        deserialize(pickled, [], "'a'")


def _exec_function(source: str, namespace: dict) -> object:
    """A function defined as in a notebook cell: its module is __main__, so it is pickled by value."""
    namespace.setdefault("__name__", "__main__")
    exec(source, namespace)
    return namespace["f"]


def _call(fn: object, *args: object) -> object:
    pickled, raw = serialize(fn, "f")
    return deserialize(pickled, raw, "f")(*args)


def test_a_notebook_function_is_pickled_once_while_its_captures_stay_the_same() -> None:
    ns: dict = {"math": math}
    f = _exec_function("def f(x):\n    return math.floor(x) * scale\n", ns)
    ns["scale"] = 2
    assert _call(f, 3.5) == 6
    first = _function_cache[f][1]
    assert _call(f, 3.5) == 6
    assert _function_cache[f][1] is first
    ns["scale"] = 3  # a new object: the pickle is made anew
    assert _call(f, 3.5) == 9


def test_a_function_capturing_a_mutable_value_is_never_cached() -> None:
    ns: dict = {"weights": [1, 2]}
    f = _exec_function("def f():\n    return sum(weights)\n", ns)
    assert _call(f) == 3
    ns["weights"].append(10)  # changed in place: only a fresh pickle sees it
    assert _call(f) == 13
    assert f not in _function_cache
