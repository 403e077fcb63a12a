"""Turn Python values into one pickle plus out-of-band buffers, and back.

cloudpickle with pickle protocol 5: large contiguous buffers (numpy arrays,
torch tensors, bytes-like objects) leave the pickle stream as separate
buffers, sent as their own frames without a copy and rebuilt on arrival
over the received memory. Torch tensors get a reducer of their own (dtype,
shape and one buffer); torch's default pickling copies through
``torch.save``. Torch is never imported here: the reducer only looks at
tensors when the sender has already imported torch.
"""

from __future__ import annotations

import io
import logging
import pickle
import sys
import types
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
        return super().reducer_override(obj)


def _reduce_tensor(tensor: Any) -> tuple[Any, ...]:
    # A lazily conjugated complex tensor (``t.conj()``) cannot be viewed as bytes;
    # resolve_conj() materializes it, and is free for every other tensor.
    detached = tensor.detach().resolve_conj()
    device = str(detached.device)
    if detached.device.type != "cpu":
        detached = detached.cpu()
    flat = detached.contiguous().reshape(-1).view(dtype=_torch().uint8)
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
    """Build a tensor over the received bytes; put it back on its GPU if there is one."""
    torch = _torch()
    raw = memoryview(payload).cast("B")
    if raw.nbytes:
        flat = torch.frombuffer(raw, dtype=torch.uint8)
    else:
        flat = torch.empty(0, dtype=torch.uint8)
    tensor = flat.view(dtype).reshape(shape)
    if device != "cpu" and _device_available(torch, device):
        tensor = tensor.to(device)
    if requires_grad:
        tensor.requires_grad_(True)
    return tensor


def _device_available(torch: Any, device: str) -> bool:
    parsed = torch.device(device)
    if parsed.type != "cuda" or not torch.cuda.is_available():
        return False
    return parsed.index is None or parsed.index < torch.cuda.device_count()


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
