"""Turn Python values into one pickle plus out-of-band buffers, and back.

cloudpickle with pickle protocol 5: large contiguous buffers (numpy arrays,
torch tensors, bytes-like objects) leave the pickle stream as separate
buffers, sent as their own frames without a copy and rebuilt on arrival
over the received memory. Torch tensors get a reducer of their own (dtype,
shape, device and one buffer; an ``nn.Parameter`` pickles as torch
makes it, around its data, which goes through that reducer); torch's
default pickling copies through ``torch.save``. A CUDA tensor lands on the
receiver's current GPU, or on its CPU with one warning where it has none.
Torch is never imported here: the reducer only looks at tensors when the
sender has already imported torch.
"""

from __future__ import annotations

import io
import logging
import pickle
import sys
import types
import warnings
import weakref
from collections import ChainMap
from collections.abc import Sequence
from typing import Any, ClassVar

import cloudpickle

from jupyter_dist.errors import SerializationError

logger = logging.getLogger(__name__)

# Buffers smaller than this stay inside the pickle: a frame of their own costs more.
OUT_OF_BAND_MIN_NBYTES = 64 * 1024


def _reduce_code(code: types.CodeType) -> tuple[Any, ...]:
    """cloudpickle's code reducer, keeping the real file name.

    cloudpickle (3.1+) writes ``<dynamic-code>`` as the file name of code it
    pickles by value; then no traceback on an engine can show the user's
    source lines. The file name does not change what the code does.
    """
    constructor, args = _cloudpickle_code_reduce(code)
    args = tuple(code.co_filename if a == _DYNAMIC_FILENAME else a for a in args)
    return constructor, args


_cloudpickle_code_reduce = cloudpickle.cloudpickle._code_reduce
_DYNAMIC_FILENAME = "<dynamic-code>"


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, plus a zero-copy reducer for torch tensors and code that keeps its file name."""

    dispatch_table: ClassVar[ChainMap[Any, Any]] = ChainMap(
        {types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table
    )

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is not None and type(obj) is torch.Tensor:
            return _reduce_tensor(obj)
        if obj is _load_function:
            return NotImplemented  # a module's function: pickled by name, no lookup needed
        if type(obj) is types.FunctionType and self._is_caching_functions:
            blob = _pickled_function(obj)
            if blob is not None:
                return _load_function, (blob,)
        return super().reducer_override(obj)

    _is_caching_functions = True


class _FunctionPickler(_Pickler):
    """Pickles one function by value for the cache (never from the cache: that would recurse)."""

    _is_caching_functions = False


# A function defined in a notebook is pickled by value, which is most of the client's
# time for a small task. Its pickle is kept while what it captured stays the same objects.
_function_cache: weakref.WeakKeyDictionary[types.FunctionType, tuple[tuple[Any, ...], bytes]] = (
    weakref.WeakKeyDictionary()
)
_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), types.ModuleType)


def _is_stable(value: Any) -> bool:
    """Whether a captured value cannot change unseen: the same object means the same pickle."""
    if isinstance(value, _IMMUTABLE):
        return True
    if isinstance(value, types.FunctionType | type):
        return bool(cloudpickle.cloudpickle._should_pickle_by_reference(value))
    return False


def _captured(fn: types.FunctionType) -> tuple[Any, ...] | None:
    """Everything a by-value pickle of ``fn`` is made of, or None if some of it may change in place."""
    if fn.__dict__:
        return None
    parts: list[Any] = [fn.__code__, fn.__defaults__, fn.__kwdefaults__]
    for name in sorted(cloudpickle.cloudpickle._extract_code_globals(fn.__code__)):
        value = fn.__globals__.get(name, _captured)  # a missing name: a builtin
        if value is not _captured and not _is_stable(value):
            return None
        parts.append(value)
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            return None
        if not _is_stable(value):
            return None
        parts.append(value)
    if any(not _is_stable(d) for d in (fn.__defaults__ or ())):
        return None
    if any(not _is_stable(d) for d in (fn.__kwdefaults__ or {}).values()):
        return None
    return tuple(parts)


def _pickled_function(fn: types.FunctionType) -> bytes | None:
    """The cached by-value pickle of ``fn``, made anew when what it captured changed."""
    cached = _function_cache.get(fn)  # first: a cached function is known to go by value
    if cached is None and cloudpickle.cloudpickle._should_pickle_by_reference(fn):
        return None
    captured = _captured(fn)
    if captured is None:
        return None
    if (
        cached is not None
        and len(cached[0]) == len(captured)
        and all(a is b for a, b in zip(cached[0], captured, strict=True))
    ):
        return cached[1]
    stream = io.BytesIO()
    _FunctionPickler(stream, protocol=5).dump(fn)
    blob = stream.getvalue()
    _function_cache[fn] = (captured, blob)
    return blob


def _load_function(blob: bytes) -> Any:
    return pickle.loads(blob)


def _reduce_tensor(tensor: Any) -> tuple[Any, ...]:
    """Send a tensor as dtype, shape, device and one buffer of its elements.

    A CPU tensor that is already contiguous goes out as its own memory; a
    device tensor is made contiguous on its device first, so that it costs
    the one device-to-host copy ``.cpu()`` makes (``.cpu().contiguous()``
    would copy a non-contiguous one twice). A lazily conjugated or negated
    tensor (``t.conj()``) cannot be viewed as bytes; resolving it is free
    for every other tensor.
    """
    detached = tensor.detach().resolve_conj().resolve_neg().contiguous()
    device = str(detached.device)
    if detached.device.type != "cpu":
        detached = detached.cpu()
    flat = detached.reshape(-1).view(dtype=_torch().uint8)
    payload = pickle.PickleBuffer(flat.numpy())
    return (
        _rebuild_tensor,
        (payload, detached.dtype, tuple(detached.shape), device, bool(tensor.requires_grad)),
    )


def _torch() -> Any:
    import torch

    return torch


def _rebuild_tensor(
    payload: Any, dtype: Any, shape: tuple[int, ...], device: str, requires_grad: bool
) -> Any:
    """Build a tensor over the received bytes; a CUDA tensor goes to this process's current GPU.

    Whatever GPU it was on at the sender, it lands on ``torch.cuda.current_device()``
    (a GPU engine's own ``cuda:0``) with one host-to-device copy; where there
    is no usable GPU it stays on the CPU, with one warning per process.
    """
    torch = _torch()
    raw = memoryview(payload).cast("B")
    if raw.nbytes:
        flat = torch.frombuffer(raw, dtype=torch.uint8)
    else:
        flat = torch.empty(0, dtype=torch.uint8)
    tensor = flat.view(dtype).reshape(shape)
    if device != "cpu":
        here = _device_here(torch, torch.device(device).type)
        if here is not None:
            tensor = tensor.to(here)
    if requires_grad:
        tensor.requires_grad_(True)
    return tensor


# The CUDA device of the thread that last sent work from this process (a notebook's), if it
# uses CUDA: results are unpickled on the client's I/O thread, whose current device is 0.
_senders_cuda_device: int | None = None


def note_senders_cuda_device() -> None:
    """Make CUDA tensors that arrive later land on the calling thread's current device.

    The client calls it in the user's thread as work is sent, so that a
    notebook that chose ``torch.cuda.set_device(1)`` gets its results on
    ``cuda:1``. Costs a dictionary lookup where torch is not imported, and
    never initialises CUDA.
    """
    global _senders_cuda_device
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        _senders_cuda_device = torch.cuda.current_device()


# Whether this process has warned that a device tensor stayed on its CPU: once is enough.
_has_warned_kept_on_cpu = False


def _device_here(torch: Any, device_type: str) -> Any:
    """This process's current device of ``device_type``, or None (and a warning, once) if it has none.

    Only called when such a tensor arrives, so that checking never
    initialises CUDA in a process that does not use it.
    """
    backend = getattr(torch, device_type, None)
    is_available = getattr(backend, "is_available", None)
    if is_available is not None and is_available():
        if device_type == "cuda":
            index = _senders_cuda_device
            return torch.device("cuda", torch.cuda.current_device() if index is None else index)
        return torch.device(device_type)
    global _has_warned_kept_on_cpu
    if not _has_warned_kept_on_cpu:
        _has_warned_kept_on_cpu = True
        warnings.warn(_kept_on_cpu_message(torch, device_type), RuntimeWarning, stacklevel=2)
    return None


def _kept_on_cpu_message(torch: Any, device_type: str) -> str:
    if device_type != "cuda":
        return (
            f"A {device_type} tensor arrived in a process without a usable {device_type} "
            "device; it is kept on the CPU, and so are such tensors that arrive after it."
        )
    why = (
        "its torch is built without CUDA"
        if torch.version.cuda is None
        else "torch finds no CUDA device here"
    )
    return (
        f"A CUDA tensor arrived in a process without a usable GPU ({why}); it is kept on "
        "the CPU, and so are the CUDA tensors that arrive after it. Start GPU engines "
        "with `%dist start --gpus all`; to bring GPU results to a notebook without a GPU, "
        "return `t.cpu()`."
    )


def _type_name(obj: Any) -> str:
    kind = type(obj)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def serialize(obj: Any, what: str) -> tuple[bytes, list[memoryview]]:
    """Pickle ``obj``; return the pickle stream and its out-of-band buffers.

    ``what`` names the value for error messages ("'conn'", "argument 1 of
    f"). Raises ``SerializationError`` naming it and its type.
    """
    buffers: list[memoryview] = []

    def keep_out_of_band(buf: pickle.PickleBuffer) -> bool:
        view = buf.raw()
        if view.nbytes < OUT_OF_BAND_MIN_NBYTES:
            return True
        buffers.append(view)
        return False

    stream = io.BytesIO()
    try:
        _Pickler(stream, protocol=5, buffer_callback=keep_out_of_band).dump(obj)
    except (pickle.PicklingError, TypeError, AttributeError, ValueError, RecursionError) as e:
        raise SerializationError(
            f"Cannot send {what} ({_type_name(obj)}): it cannot be pickled ({e}). "
            "Create such objects on the engines instead, e.g. "
            "`c.run('conn = sqlite3.connect(...)')`."
        ) from e
    return stream.getvalue(), buffers


def deserialize(pickled: bytes | memoryview, buffers: Sequence[memoryview], what: str) -> Any:
    """Rebuild a value from ``serialize``'s output, over the given buffers without copying.

    Raises ``SerializationError`` when the receiver cannot load it (most
    often a module that is installed where the value was made, but not here).
    """
    try:
        return pickle.loads(pickled, buffers=buffers)
    except ModuleNotFoundError as e:
        raise SerializationError(
            f"Cannot load {what}: module {e.name!r} is not installed here. "
            "Install it in the environment of the notebook and of every engine."
        ) from e
    except Exception as e:  # any error of any class's __setstate__ may surface here
        raise SerializationError(f"Cannot load {what}: {type(e).__name__}: {e}") from e
