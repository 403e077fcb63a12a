"""What a sender with a GPU sends for a CUDA tensor, made on a machine without one.

The tensor reducer's own output for a CPU tensor, its device swapped for a
CUDA one: the receiver gets exactly the stream a CUDA sender would have
produced (the bytes cross as host memory either way), so the arrival of a
CUDA tensor can be tested where there is no GPU, without mocking torch.
"""

from __future__ import annotations

from typing import Any

import torch

from jupyter_dist.serialize import _reduce_tensor


class SentFromGpu:
    """Pickles as ``tensor`` would from ``device`` (e.g. "cuda:3") of a process with GPUs."""

    def __init__(self, tensor: torch.Tensor, device: str) -> None:
        self.tensor = tensor
        self.device = device

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild, (payload, dtype, shape, _, requires_grad) = _reduce_tensor(self.tensor)
        return rebuild, (payload, dtype, shape, self.device, requires_grad)
